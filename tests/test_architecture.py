"""The project's shape: which package may import which, and where stored words are spelled.

Dependencies point one way: harness -> zoo -> solvers. Inside the harness,
the attack imports neither the run nor the report, the run does not import
the report, and the report reads only the store's schema (and the shared
vocabulary). Training uses the attacks (adversarial training) and the
certificates' interval bounds (certified training), never the run that
schedules it; the certificates use the attacks' exact verification (a
counterexample counts only once verified) but neither training, the run nor
the report. No package cycle exists among the harness's rooms, lazy imports
inside functions included, and no module uses another module's private
names. Every stored status and ball kind is spelled once, by its enum in
:mod:`harness.vocabulary`.
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
    ("harness.train", ("harness.run", "harness.report"), ()),
    ("harness.certify", ("harness.train", "harness.run", "harness.report"), ()),
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


def _room(name: str) -> str | None:
    """The room of the harness a module belongs to (``harness.run`` for ``harness.run.store``), or None outside them."""
    parts = name.split(".")
    if parts[0] != "harness" or len(parts) < 2:
        return None
    room = ROOT / "harness" / parts[1]
    return f"harness.{parts[1]}" if room.is_dir() or room.with_suffix(".py").is_file() else None


def _room_graph() -> dict[str, set[str]]:
    """Which room imports which, from every import statement (those inside functions too)."""
    graph: dict[str, set[str]] = {}
    for path in _sources("harness"):
        importer = _room(_module_name(path))
        if importer is None:
            continue
        graph.setdefault(importer, set()).update(
            room for room in map(_room, _imports(path)) if room is not None and room != importer
        )
    return graph


def test_the_harness_rooms_import_each_other_without_cycles():
    graph = _room_graph()
    # The lazy imports count: the run starts training and certificates from inside functions.
    assert {"harness.train", "harness.certify"} <= graph["harness.run"]
    assert "harness.certify" in graph["harness.train"]
    finished: set[str] = set()

    def cycle_from(room: str, path: list[str]) -> list[str] | None:
        if room in path:
            return path[path.index(room):] + [room]
        if room in finished:
            return None
        for imported in sorted(graph.get(room, ())):
            found = cycle_from(imported, path + [room])
            if found:
                return found
        finished.add(room)
        return None

    cycles = [cycle for cycle in (cycle_from(room, []) for room in sorted(graph)) if cycle]
    assert not cycles, "package cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _project_module(name: str) -> bool:
    parts = name.split(".")
    return parts[0] in PACKAGES and (ROOT.joinpath(*parts).is_dir() or ROOT.joinpath(*parts).with_suffix(".py").is_file())


def _private_uses(path: Path, module: str | None = None) -> list[str]:
    """Private names the module ``module`` (default: the one at ``path``) takes from other modules: ``from m import
    _x``, ``import a._b``, or ``m._x`` on a project module ``m`` it imported."""
    module = module or _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    tree = ast.parse(path.read_text(), str(path))
    found, modules = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if any(_private(part) for part in alias.name.split(".")):
                    found.append(f"{shown}:{node.lineno} imports {alias.name}")
                modules[alias.asname or alias.name.partition(".")[0]] = alias.name if alias.asname else alias.name.partition(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if any(_private(part) for part in base.split(".")):
                found.append(f"{shown}:{node.lineno} imports from {base}")
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{shown}:{node.lineno} imports {base}.{alias.name}")
                elif _project_module(f"{base}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{base}.{alias.name}"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr)
            and node.value.id in modules and _project_module(modules[node.value.id]) and modules[node.value.id] != module
        ):
            found.append(f"{shown}:{node.lineno} uses {modules[node.value.id]}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    offending = [use for path in _sources(*PACKAGES) for use in _private_uses(path)]
    assert not offending, "make the name public or move it:\n" + "\n".join(offending)


def test_the_private_name_checker_sees_every_form(tmp_path):
    """Each form the rule forbids is found (else the rule would pass vacuously), and the allowed forms are not."""
    source = tmp_path / "probe.py"
    source.write_text(
        "from __future__ import annotations\n"
        "import ray._private.services\n"
        "from ray._private.services import find_bootstrap_address\n"
        "from solvers.plan_space import _offsets, plan_image\n"
        "from solvers import plan_space\n"
        "from . import layers as rules\n"
        "plan_space._offsets, rules._padding_amounts, plan_image.__name__\n"
        "def method(self):\n"
        "    return self._private\n"
    )
    found = _private_uses(source, "harness.certify.probe")
    assert [use.split(" ", 1)[1] for use in found] == [
        "imports ray._private.services",
        "imports from ray._private.services",
        "imports solvers.plan_space._offsets",
        "uses solvers.plan_space._offsets",
        "uses harness.certify.layers._padding_amounts",
    ]


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
