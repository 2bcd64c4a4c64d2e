"""Certificates against the standard evaluation suite, from the stored tables: contradictions and the safety margin's effect.

Usage::

    python benchmarks/certify_soundness.py RESULTS_DIR

``RESULTS_DIR`` holds a certify run (``grid=certify``) and a suite run
(``grid=evaluate``) of the same models on the same test images. The script

1. lists every (model, ball, example, radius) certified by some certify cell
   (a ``certified`` row, or the example's certified radius) for which the
   suite verified an adversarial example within that radius (suite minimal
   verified radius <= certified radius): no sound certifier and sound
   verification can produce one;
2. prints, per model, certify cell and radius, how many verdicts the safety
   margin changed: rows whose raw margin bound (``margin_lower``) is
   positive but does not exceed the safety margin, so that without the
   margin they would have been ``certified``. Where the store has a
   ``safety_margin`` column those are the rows with
   ``0 < margin_lower <= safety_margin``; otherwise the undecided rows
   (``unknown`` or ``timeout``) with ``margin_lower > 0``, which is the same
   set (a certifier certifies exactly where its raw bound exceeds the
   margin).

Exit status: 1 if any certificate is contradicted, 2 if the folder lacks
certificates or suite rows, 0 otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from harness.report.leaderboard import certificate_violations
from harness.run.store import Table, read_table
from harness.vocabulary import CertificateStatus

UNDECIDED = (CertificateStatus.UNKNOWN.value, CertificateStatus.TIMEOUT.value)
"""The statuses a verdict the safety margin changed has: the certifier could not decide it."""


def suite_examples(examples: pd.DataFrame) -> pd.DataFrame:
    """The rows of the examples table that the standard evaluation suite wrote (any version)."""
    return examples[examples["suite"].notna()]


def contradictions(examples: pd.DataFrame, certificates: pd.DataFrame) -> pd.DataFrame:
    """Every certificate a verified suite radius contradicts (``certificate_violations`` on the suite's rows), with the
    suite's name and version."""
    suite = suite_examples(examples)
    violations = certificate_violations(suite, certificates)
    if violations.empty:
        return violations
    versions = suite[["cell_id", "suite", "suite_version"]].drop_duplicates("cell_id").rename(columns={"cell_id": "attack_cell_id"})
    return violations.merge(versions, on="attack_cell_id", how="left")


def margin_changed(certificates: pd.DataFrame) -> pd.Series:
    """Per row of the certificates table: whether the safety margin changed its verdict (module docstring)."""
    raw = certificates["margin_lower"]
    if "safety_margin" in certificates and certificates["safety_margin"].notna().any():
        return (raw > 0) & (raw <= certificates["safety_margin"])
    return (raw > 0) & certificates["status"].isin(UNDECIDED)


def margin_table(certificates: pd.DataFrame) -> pd.DataFrame:
    """Per model, certify cell (certifier, box) and radius: rows evaluated, certified, and changed by the safety margin."""
    evaluated = certificates[certificates["margin_lower"].notna()].assign(
        certified=lambda frame: frame["status"] == CertificateStatus.CERTIFIED.value,
        changed=margin_changed,
    )
    keys = ["model", "certifier", "box", "eps"]
    table = evaluated.groupby(keys, observed=True).agg(
        evaluated=("status", "size"), certified=("certified", "sum"), changed_by_margin=("changed", "sum"),
    )
    return table.reset_index().sort_values(keys, kind="stable").reset_index(drop=True)


BLOCK_KINDS = ("soundness",)


def generate(kind: str, folders, options: dict) -> str:
    """A generated block (``benchmarks/regenerate_results.py``): ``soundness``, the margin table and the contradictions."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from certify_table import markdown_table

    if kind not in BLOCK_KINDS:
        raise ValueError(f"certify_soundness.py writes no block of kind {kind!r} (kinds: {', '.join(BLOCK_KINDS)})")
    (folder,) = folders
    certificates = read_table(folder.path, Table.CERTIFICATES)
    examples = read_table(folder.path, Table.EXAMPLES)
    if certificates.empty or suite_examples(examples).empty:
        raise ValueError(f"{folder.shown} needs both certificates and rows of the evaluation suite: run {folder.command}")
    table = margin_table(certificates).rename(columns={"changed_by_margin": "changed by the safety margin"})
    found = contradictions(examples, certificates)
    checked = int((certificates["status"] == CertificateStatus.CERTIFIED.value).sum())
    verdict = (f"**{len(found)} certificates are contradicted** by a verified suite radius." if len(found)
               else f"No certificate is contradicted: {checked} certified rows checked against the suite's verified radii.")
    return markdown_table(table) + "\n\n" + verdict


def main(results_dir: str) -> int:
    certificates = read_table(results_dir, Table.CERTIFICATES)
    examples = read_table(results_dir, Table.EXAMPLES)
    if certificates.empty:
        print(f"{results_dir} holds no certificates: run grid=certify into it first")
        return 2
    if suite_examples(examples).empty:
        print(f"{results_dir} holds no rows of the evaluation suite: run grid=evaluate into it first")
        return 2
    pd.set_option("display.width", 200)
    print("Verdicts the safety margin changed (raw bound > 0 but not above the margin), per model, certify cell and radius:\n")
    print(margin_table(certificates).to_string(index=False))
    found = contradictions(examples, certificates)
    if len(found):
        print(f"\n{len(found)} certificate(s) contradicted by a verified suite radius (suite radius <= certified radius):\n")
        print(found.to_string(index=False))
        return 1
    certified = certificates[certificates["status"] == CertificateStatus.CERTIFIED.value]
    print(f"\nNo certificate is contradicted: {len(certified)} certified rows checked against the suite's verified radii.")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
