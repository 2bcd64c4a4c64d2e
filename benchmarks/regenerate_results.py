"""Regenerate the results pages (docs/results/*.md) from their results folders, as a manifest lists them.

Usage::

    python benchmarks/regenerate_results.py --manifest docs/results/pages.toml \\
        [--results-root DIR] [--data-root DIR] [--weights-dir DIR] [--page NAME ...] [--allow-missing]
    python benchmarks/regenerate_results.py --manifest docs/results/pages.toml --check
    python benchmarks/regenerate_results.py --manifest docs/results/pages.toml --provenance-only

The manifest (TOML) names, for each page, its generated blocks: the script
that writes each (``generator``, one of ``benchmarks/*.py``; it exposes
``generate(kind, folders, options) -> str``), the block ``kind``, the results
folders it reads and its ``options``; and, for each folder, where it is and the
command that fills it. Paths and commands hold placeholders (``$RESULTS_ROOT``,
``$DATA_ROOT``, ``$WEIGHTS_DIR``), resolved from the options above, else the
environment, else the manifest's ``[placeholders]``; pages print them
unresolved.

For each page (``--page``: only these, by file name without ``.md``), every
block is written by its generator and put in place of the page's block of the
same name (:mod:`generated_blocks`: markers, stamp of the commit and day);
the prose around the blocks is kept. A page without a file starts as its
title. Each page's first block, ``provenance``, is the command that
regenerates it and its folders with the commands that fill them;
``index.md``'s table of pages comes from the manifest.

A page whose folder is missing is skipped, and the command that makes the
folder printed; the exit status is then 1 unless ``--allow-missing``. A
regenerated page is marked ``state = "regenerated"`` in the manifest.

``--check`` writes nothing and reports, per page: blocks not yet written by
their script (content kept from a hand-made page), blocks whose stamp is
older than the code that writes them or than the cells of their folders,
missing folders, Markdown tables outside the blocks, and figures in the
prose found in no block. It exits 1 only when a page's structure is broken
(unparsable markers, a table outside the blocks, a block the manifest names
missing from the page, no provenance block).

``--provenance-only`` rewrites the provenance blocks and the index only; it
needs no results folder.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from generated_blocks import (  # noqa: E402
    Block, BlockError, Folder, code_stamp, parse_blocks, prose_figures_outside_blocks, render_block, replace_blocks,
    tables_outside_blocks,
)

SELF = "benchmarks/regenerate_results.py"
PROVENANCE = "provenance"
REGENERATED = "regenerated"
NOT_YET = "not yet regenerated"
STATES = (REGENERATED, NOT_YET)
SHARED_CODE = ("benchmarks/generated_blocks.py", "benchmarks/results_page.py", "benchmarks/attack_table.py", "harness/report")
"""Code every generator's tables go through: a change there makes every block older than it stale."""
_PLACEHOLDER = re.compile(r"\$(\{(?P<braced>[A-Z_][A-Z0-9_]*)\}|(?P<bare>[A-Z_][A-Z0-9_]*))")


class ManifestError(ValueError):
    """A manifest that does not say what a page needs."""


@dataclass(frozen=True)
class FolderSpec:
    key: str
    path: str
    command: str
    exists: tuple[str, ...] = ("cells",)


@dataclass(frozen=True)
class BlockSpec:
    name: str
    generator: str
    kind: str
    folders: tuple[str, ...]
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PageSpec:
    file: str
    title: str
    summary: str
    state: str
    blocks: tuple[BlockSpec, ...]

    @property
    def name(self) -> str:
        return Path(self.file).stem

    def folder_keys(self) -> list[str]:
        keys: list[str] = []
        for block in self.blocks:
            keys += [key for key in block.folders if key not in keys]
        return keys


@dataclass(frozen=True)
class Manifest:
    path: Path
    pages_dir: Path
    placeholders: dict[str, str]
    folders: dict[str, FolderSpec]
    pages: tuple[PageSpec, ...]

    def relative(self) -> str:
        try:
            return self.path.resolve().relative_to(ROOT).as_posix()
        except ValueError:
            return str(self.path)


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and check a manifest: every block names a known generator file and folder, every name is unique."""
    path = Path(path)
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    problems = []
    folders = {}
    for key, spec in data.get("folders", {}).items():
        if "path" not in spec or "command" not in spec:
            problems.append(f"folder {key!r} needs a path and a command")
            continue
        folders[key] = FolderSpec(key, spec["path"], spec["command"], tuple(spec.get("exists", ["cells"])))
    pages, files = [], set()
    for page in data.get("pages", []):
        file = page.get("file", "")
        if not file.endswith(".md") or file in files:
            problems.append(f"page {file!r}: a file name ending in .md, once")
        files.add(file)
        state = page.get("state", NOT_YET)
        if state not in STATES:
            problems.append(f"page {file!r}: state {state!r} is not one of {', '.join(map(repr, STATES))}")
        blocks, names = [], {PROVENANCE}
        for block in page.get("blocks", []):
            name = block.get("name", "")
            if not name or name in names:
                problems.append(f"page {file!r}: block name {name!r} missing, reserved or used twice")
            names.add(name)
            generator = block.get("generator", "")
            if not (ROOT / generator).is_file():
                problems.append(f"page {file!r}, block {name!r}: generator {generator!r} is not a file of the repository")
            unknown = [key for key in block.get("folders", []) if key not in folders]
            if unknown:
                problems.append(f"page {file!r}, block {name!r}: unknown folders {', '.join(unknown)}")
            blocks.append(BlockSpec(name, generator, block.get("kind", name), tuple(block.get("folders", [])), dict(block.get("options", {}))))
        pages.append(PageSpec(file, page.get("title", Path(file).stem), page.get("summary", ""), state, tuple(blocks)))
    if problems:
        raise ManifestError(f"{path}:\n  " + "\n  ".join(problems))
    pages_dir = (path.parent / data.get("pages_dir", ".")).resolve()
    return Manifest(path, pages_dir, dict(data.get("placeholders", {})), folders, tuple(pages))


def resolve(text: str, values: dict[str, str]) -> str:
    """``text`` with its ``$NAME`` placeholders replaced; :class:`ManifestError` naming any without a value."""
    missing = []

    def value(match: re.Match) -> str:
        name = match["braced"] or match["bare"]
        if not values.get(name):
            missing.append(name)
            return match[0]
        return values[name]

    resolved = _PLACEHOLDER.sub(value, text)
    if missing:
        raise ManifestError(f"no value for {', '.join(sorted(set(missing)))} in {text!r}: pass it as an option or set it in the environment")
    return resolved


def placeholder_values(manifest: Manifest, options: dict[str, str | None]) -> dict[str, str]:
    """Command-line options, else the environment, else the manifest's defaults."""
    names = set(manifest.placeholders) | set(options)
    return {name: options.get(name) or os.environ.get(name) or manifest.placeholders.get(name, "") for name in names}


def folder(manifest: Manifest, key: str, values: dict[str, str]) -> Folder:
    spec = manifest.folders[key]
    path = Path(resolve(spec.path, values))
    if not path.is_absolute():
        path = ROOT / path
    return Folder(key, path, spec.path, spec.command)


def missing_parts(manifest: Manifest, key: str, values: dict[str, str]) -> list[str]:
    """What of folder ``key`` is missing (its ``exists`` entries), or why it cannot be resolved."""
    try:
        located = folder(manifest, key, values)
    except ManifestError as error:
        return [str(error)]
    return [str(located.path / part) for part in manifest.folders[key].exists if not (located.path / part).exists()]


def generator_module(path: str):
    """The generator script as a module (``benchmarks/`` is on the path, so the scripts share their modules)."""
    return importlib.import_module(Path(path).stem)


# ----------------------------------------------------------------------------------------------------------------
# Blocks written from the manifest itself: a page's provenance, and the index
# ----------------------------------------------------------------------------------------------------------------


def page_command(manifest: Manifest, page: PageSpec) -> str:
    return f"python {SELF} --manifest {manifest.relative()} --page {page.name}"


def provenance_body(manifest: Manifest, page: PageSpec) -> str:
    lines = [f"Regenerate this page: `{page_command(manifest, page)}`", ""]
    keys = page.folder_keys()
    if keys:
        lines += ["Results folders it reads, and the command that fills each:", ""]
        for key in keys:
            spec = manifest.folders[key]
            lines.append(f"- `{spec.path}`: `{spec.command}`")
    else:
        lines.append("It reads no results folder: it is written from the manifest alone.")
    return "\n".join(lines)


def _page_state(manifest: Manifest, page: PageSpec) -> str:
    path = manifest.pages_dir / page.file
    if not path.is_file():
        return "not written yet"
    try:
        blocks = [block for block in parse_blocks(path.read_text(encoding="utf-8")) if block.name != PROVENANCE]
    except BlockError:
        return "markers broken"
    if not blocks:
        return "no generated block"
    if not all(block.stamp.generated for block in blocks):
        return NOT_YET
    return f"regenerated {max(block.stamp.date for block in blocks)}"


def index_body(manifest: Manifest) -> str:
    lines = ["| page | what it holds | results folders | state |", "| :--- | :--- | :--- | :--- |"]
    for page in manifest.pages:
        if not page.blocks or all(block.generator == SELF for block in page.blocks):
            continue  # the index itself
        folders = ", ".join(f"`{manifest.folders[key].path}`" for key in page.folder_keys())
        summary = page.summary.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| [{page.file}]({page.file}) | {summary} | {folders} | {_page_state(manifest, page)} |")
    return "\n".join(lines)


def own_block(manifest: Manifest, spec: BlockSpec) -> str:
    if spec.kind == "index":
        return index_body(manifest)
    raise ManifestError(f"{SELF} writes no block of kind {spec.kind!r} (kinds: index)")


# ----------------------------------------------------------------------------------------------------------------
# Writing a page
# ----------------------------------------------------------------------------------------------------------------


def _with_provenance(text: str, provenance: Block) -> str:
    """``text`` with its provenance block replaced, or inserted after the title when it has none."""
    if any(block.name == PROVENANCE for block in parse_blocks(text)):
        return replace_blocks(text, [provenance])[0]
    lines = text.splitlines()
    title = next((index for index, line in enumerate(lines) if line.startswith("# ")), -1)
    lines[title + 1:title + 1] = ["", render_block(provenance)]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_page(manifest: Manifest, page: PageSpec, bodies: dict[str, str], stamp) -> tuple[str, list[str]]:
    """The page's new text: its provenance and the given block bodies in place, the rest kept; and the names of
    blocks on the page that the manifest does not list (kept as they are)."""
    path = manifest.pages_dir / page.file
    text = path.read_text(encoding="utf-8") if path.is_file() else f"# {page.title}\n"
    provenance = Block(PROVENANCE, SELF, provenance_body(manifest, page), kind=PROVENANCE, stamp=stamp)
    text = _with_provenance(text, provenance)
    specs = {spec.name: spec for spec in page.blocks}
    blocks = [
        Block(name, specs[name].generator, body, kind=specs[name].kind,
              sources=tuple(manifest.folders[key].path for key in specs[name].folders), stamp=stamp)
        for name, body in bodies.items()
    ]
    text, others = replace_blocks(text, blocks)
    return text, [name for name in others if name != PROVENANCE and name not in specs]


def mark_regenerated(manifest: Manifest, page: PageSpec) -> None:
    """Set the page's ``state`` in the manifest file to regenerated (a text edit: comments and layout stay)."""
    lines = manifest.path.read_text(encoding="utf-8").splitlines()
    inside = False
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped == "[[pages]]":
            inside = False
        elif re.fullmatch(rf'file\s*=\s*"{re.escape(page.file)}"', stripped):
            inside = True
        elif inside and re.match(r"state\s*=", stripped):
            lines[index] = line[:len(line) - len(line.lstrip())] + f'state = "{REGENERATED}"'
            manifest.path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            return


def structure_problems(manifest: Manifest, page: PageSpec, text: str) -> list[str]:
    """What makes a page break the convention: see the module docstring."""
    try:
        blocks = parse_blocks(text)
    except BlockError as error:
        return [f"markers: {error}"]
    problems = []
    names = [block.name for block in blocks]
    if PROVENANCE not in names:
        problems.append("no provenance block (the command that regenerates the page)")
    elif names[0] != PROVENANCE:
        problems.append("the provenance block is not the page's first block")
    problems += [f"block {spec.name!r} of the manifest is not on the page" for spec in page.blocks if spec.name not in names]
    problems += [f"line {number}: a table outside the generated blocks: {line.strip()[:60]}" for number, line in tables_outside_blocks(text)]
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Staleness
# ----------------------------------------------------------------------------------------------------------------


def _git(*arguments: str) -> tuple[int, str]:
    try:
        run = subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return 1, str(error)
    return run.returncode, run.stdout.strip()


def _newest_cell(path: Path) -> datetime.date | None:
    if not (path / "cells").is_dir():
        return None
    try:
        from harness.run.store import Table, read_table

        cells = read_table(path, Table.CELLS)
    except Exception:  # noqa: BLE001 - a store this check cannot read is reported as not checked
        return None
    import pandas as pd

    times = pd.to_datetime(cells.get("finished_at", pd.Series(dtype=object)), utc=True, errors="coerce").dropna()
    return times.max().date() if len(times) else None


def stale_reasons(manifest: Manifest, spec: BlockSpec, block: Block, values: dict[str, str]) -> list[str]:
    """Why a block on a page is out of date (empty: it is not)."""
    if not block.stamp.generated:
        return ["not yet regenerated (content kept from the hand-made page)"]
    reasons = []
    commit = block.stamp.clean_commit
    if block.stamp.commit.endswith("-dirty"):
        reasons.append(f"written from uncommitted code on top of {commit[:10]}")
    code, _ = _git("cat-file", "-e", f"{commit}^{{commit}}")
    if code != 0:
        return reasons + [f"its commit {commit[:10]} is not in this repository"]
    paths = list(dict.fromkeys([spec.generator, *SHARED_CODE]))
    _, newer = _git("log", "--format=%h %cs %s", f"{commit}..HEAD", "--", *paths)
    if newer:
        latest = newer.splitlines()[0][:90]
        reasons.append(f"older than the code: {len(newer.splitlines())} commit(s) since {commit[:10]} change "
                       f"{', '.join(paths)} (latest: {latest})")
    _, changed = _git("status", "--porcelain", "--", *paths)
    if changed:
        reasons.append(f"its code has uncommitted changes: {', '.join(line[3:] for line in changed.splitlines())}")
    for key in spec.folders:
        try:
            newest = _newest_cell(folder(manifest, key, values).path)
        except ManifestError:
            continue
        if newest is not None and block.stamp.date != "none" and newest.isoformat() > block.stamp.date:
            reasons.append(f"older than its data: folder {key} holds cells finished {newest.isoformat()}")
    return reasons


def check(manifest: Manifest, pages: list[PageSpec], values: dict[str, str], out=None) -> int:
    out = out or sys.stdout
    broken = 0
    for page in pages:
        path = manifest.pages_dir / page.file
        out.write(f"{page.file} (manifest: {page.state})\n")
        if not path.is_file():
            out.write("  the page does not exist\n")
            broken += 1
            continue
        text = path.read_text(encoding="utf-8")
        problems = structure_problems(manifest, page, text)
        for problem in problems:
            out.write(f"  BROKEN: {problem}\n")
        broken += bool(problems)
        try:
            blocks = {block.name: block for block in parse_blocks(text)}
        except BlockError:
            continue
        for spec in page.blocks:
            if spec.name in blocks:
                for reason in stale_reasons(manifest, spec, blocks[spec.name], values):
                    out.write(f"  stale: block {spec.name!r}: {reason}\n")
        written = all(blocks[spec.name].stamp.generated for spec in page.blocks if spec.name in blocks)
        if written and page.state == NOT_YET:
            out.write(f'  the manifest says "{NOT_YET}" but every block is stamped: set state = "{REGENERATED}"\n')
        if not written and page.state == REGENERATED:
            out.write(f'  the manifest says "{REGENERATED}" but some block is not: set state = "{NOT_YET}"\n')
        for key in page.folder_keys():
            missing = missing_parts(manifest, key, values)
            if missing:
                out.write(f"  folder {key} missing ({'; '.join(missing)})\n")
        figures = prose_figures_outside_blocks(text)
        if figures:
            out.write(f"  prose figures found in no block: {', '.join(f'line {n}: {f}' for n, f in figures)}\n")
    return 1 if broken else 0


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def regenerate(manifest: Manifest, pages: list[PageSpec], values: dict[str, str], allow_missing: bool,
               provenance_only: bool = False, out=None) -> int:
    out = out or sys.stdout
    stamp = code_stamp()
    failed, skipped = 0, {}
    ordered = sorted(pages, key=lambda page: any(spec.kind == "index" for spec in page.blocks))  # the index last
    for page in ordered:
        own = [spec for spec in page.blocks if spec.generator == SELF]
        specs = own if provenance_only else list(page.blocks)
        if not provenance_only:
            missing = {key: missing_parts(manifest, key, values) for key in page.folder_keys()}
            missing = {key: parts for key, parts in missing.items() if parts}
            if missing:
                for key, parts in missing.items():
                    spec = manifest.folders[key]
                    try:
                        command = resolve(spec.command, values)
                    except ManifestError:
                        command = spec.command
                    out.write(f"{page.file}: skipped, folder {key} is missing ({'; '.join(parts)}); make it with:\n    {command}\n")
                    skipped[key] = command
                continue
        bodies = {}
        try:
            for spec in specs:
                if spec.generator == SELF:
                    bodies[spec.name] = own_block(manifest, spec)
                else:
                    folders = [folder(manifest, key, values) for key in spec.folders]
                    bodies[spec.name] = generator_module(spec.generator).generate(spec.kind, folders, spec.options)
        except Exception as error:  # noqa: BLE001 - one page's failure is reported, the others still run
            out.write(f"{page.file}: FAILED in block {spec.name!r} ({spec.generator}, kind {spec.kind}): {type(error).__name__}: {error}\n")
            failed += 1
            continue
        try:
            text, unknown = write_page(manifest, page, bodies, stamp)
        except BlockError as error:
            out.write(f"{page.file}: FAILED, its markers do not parse: {error}\n")
            failed += 1
            continue
        (manifest.pages_dir / page.file).write_text(text, encoding="utf-8")
        problems = structure_problems(manifest, page, text)
        written = ", ".join([PROVENANCE, *bodies])
        out.write(f"{page.file}: wrote {written}\n")
        for name in unknown:
            out.write(f"  block {name!r} is on the page but not in the manifest: kept as it is\n")
        for problem in problems:
            out.write(f"  BROKEN: {problem}\n")
        failed += bool(problems)
        if not provenance_only and not problems:
            mark_regenerated(manifest, page)
        figures = prose_figures_outside_blocks(text)
        if figures and not provenance_only:
            out.write(f"  check the prose: figures found in no block: {', '.join(f'line {n}: {f}' for n, f in figures)}\n")
    if skipped:
        out.write("\nMissing folders: run these, then this command again:\n" + "".join(f"    {c}\n" for c in dict.fromkeys(skipped.values())))
    if failed:
        return 1
    return 0 if (allow_missing or not skipped) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=str(ROOT / "docs" / "results" / "pages.toml"))
    parser.add_argument("--results-root", help="$RESULTS_ROOT (default: the environment, else the manifest's)")
    parser.add_argument("--data-root", help="$DATA_ROOT (default: the environment, else the manifest's)")
    parser.add_argument("--weights-dir", help="$WEIGHTS_DIR (default: the environment, else the manifest's)")
    parser.add_argument("--page", nargs="+", help="only these pages (file names without .md)")
    parser.add_argument("--allow-missing", action="store_true", help="exit 0 when pages were skipped for missing folders")
    parser.add_argument("--check", action="store_true", help="write nothing; report stale blocks, missing folders and broken pages")
    parser.add_argument("--provenance-only", action="store_true", help="rewrite only the provenance blocks and the index")
    arguments = parser.parse_args(argv)
    try:
        manifest = load_manifest(arguments.manifest)
    except (ManifestError, OSError, tomllib.TOMLDecodeError) as error:
        print(error, file=sys.stderr)
        return 2
    pages = list(manifest.pages)
    if arguments.page:
        unknown = sorted(set(arguments.page) - {page.name for page in pages})
        if unknown:
            print(f"no page {', '.join(unknown)} in {arguments.manifest}; pages: {', '.join(p.name for p in pages)}", file=sys.stderr)
            return 2
        pages = [page for page in pages if page.name in arguments.page]
    values = placeholder_values(manifest, {
        "RESULTS_ROOT": arguments.results_root, "DATA_ROOT": arguments.data_root, "WEIGHTS_DIR": arguments.weights_dir,
    })
    if arguments.check:
        return check(manifest, pages, values)
    return regenerate(manifest, pages, values, arguments.allow_missing, arguments.provenance_only)


if __name__ == "__main__":
    sys.exit(main())
