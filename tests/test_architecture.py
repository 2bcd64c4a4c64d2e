"""The project's shape: which package may import which, and where stored words are spelled.

Dependencies point one way: harness -> zoo -> solvers. Inside the harness,
the attack imports neither the run nor the report, the run does not import
the report, and the report reads only the store's schema (and the shared
vocabulary). Every stored status and ball kind is spelled once, by its enum
in :mod:`harness.vocabulary`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from harness.vocabulary import BallKind, CellStatus, VerificationStatus

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("solvers", "zoo", "harness")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved to absolute names."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def _sources(*packages: str) -> list[Path]:
    return sorted(path for package in packages for path in (ROOT / package).rglob("*.py"))


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# (importing package, forbidden packages, allowed exceptions)
RULES = [
    ("solvers", ("zoo", "harness"), ()),
    ("zoo", ("harness",), ()),
    ("harness.vocabulary", ("harness", "zoo", "solvers"), ("harness.vocabulary",)),
    ("harness.attack", ("harness.run", "harness.report"), ()),
    ("harness.run", ("harness.report",), ()),
    ("harness.report", ("harness",), ("harness.report", "harness.run.store", "harness.vocabulary")),
]


@pytest.mark.parametrize("importer, forbidden, allowed", RULES, ids=[rule[0] for rule in RULES])
def test_imports_point_one_way(importer, forbidden, allowed):
    offending = []
    for path in _sources(*PACKAGES):
        if not _inside(_module_name(path), importer):
            continue
        for name in _imports(path):
            if any(_inside(name, bad) for bad in forbidden) and not any(_inside(name, ok) for ok in allowed):
                offending.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offending, "\n".join(offending)


def test_the_rule_checker_sees_relative_imports(tmp_path):
    """The checker resolves ``from ..x import y`` (else every rule above would pass vacuously)."""
    report = ROOT / "harness" / "report" / "build.py"
    assert "harness.run.store" in _imports(report)
    assert any(_inside(name, "harness.report") for name in _imports(report))


STORED_WORDS = (
    {kind.value for kind in BallKind} | {status.value for status in CellStatus} | {status.name for status in VerificationStatus}
)


def test_stored_words_are_spelled_only_by_their_enums():
    spelled = []
    for path in _sources("harness"):
        if path.name == "vocabulary.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in STORED_WORDS:
                spelled.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not spelled, "use the enum of harness.vocabulary:\n" + "\n".join(spelled)
