"""The package's layout: every module imports in a fresh interpreter; the modules' imports of each
other, at the top of a file or inside a function, form no circle (a circle makes the import order
decide what works); and each subpackage imports only the layers below it (the mixture knows nothing
of data or training)."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lmoe"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}

# What each part may import: the mixture at the top of the package; data beside it, knowing nothing
# of it; the rest built on those. cli and the package's own __init__ may import anything.
GROUPS = ("core", "data", "modular", "evaluation", "training", "integrations", "compare")
MAY_IMPORT = {
    "core": {"core"},
    "data": {"data"},
    "modular": {"core", "modular"},
    "evaluation": {"core", "data", "evaluation"},
    "training": {"core", "data", "modular", "evaluation", "training"},
    "integrations": {"core", "modular", "training", "integrations"},
    "compare": {"core", "data", "evaluation", "training", "compare"},  # runs and scores trainings
}
ANYTHING = {"lmoe", "lmoe.cli", "lmoe.cli_settings"}  # the command line and its settings
# Below every part: plumbing any module may use, itself importing no lmoe module.
FOUNDATION = {"lmoe.settings"}


def group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in GROUPS else "core"


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> set[str]:
    """The lmoe modules an import statement loads (`from pkg import name` loads pkg.name where
    that is a module)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in MODULES}
    if node.level:
        package = (
            importer if MODULES[importer].name == "__init__.py" else importer.rsplit(".", 1)[0]
        )
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    if target not in MODULES:
        return set()
    subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES}
    return subs | ({target} if len(subs) < len(node.names) else set())


def imports(module: str) -> set[str]:
    """Every lmoe module that `module` imports, at its top or inside a function."""
    tree = ast.parse(MODULES[module].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= resolve(module, node)
    return found - {module}


GRAPH = {name: imports(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the directed graph as [a, b, ..., a], or None (depth-first
    search, three colours)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_imports_see_function_level_relative_and_from_package_imports():
    """The graph's reader, on the imports it must see: a relative import inside a function,
    `from .. import x` of a module, and a name (not a module) from a package's __init__."""
    assert "lmoe.training.loop" in GRAPH["lmoe.cli"]  # inside cli's functions only
    assert (
        "lmoe.data.benchmarks" in GRAPH["lmoe.evaluation.scoring"]
    )  # from ..data import benchmarks
    assert "lmoe.evaluation.analysis" in GRAPH["lmoe.training.evaluation"]  # inside a function
    assert GRAPH["lmoe.version"] == set()


def test_no_import_circle_between_the_modules_also_through_imports_inside_functions():
    assert find_cycle(GRAPH) is None, f"import circle: {' -> '.join(find_cycle(GRAPH))}"


def test_each_part_imports_only_the_layers_below_it():
    wrong = [
        f"{a} imports {b}"
        for a, targets in GRAPH.items()
        if a not in ANYTHING
        for b in sorted(targets)
        if b not in ANYTHING | FOUNDATION and group(b) not in MAY_IMPORT[group(a)]
    ]
    assert not wrong, "layering broken: " + "; ".join(wrong)


def test_the_foundation_imports_no_lmoe_module():
    assert {name: GRAPH[name] for name in FOUNDATION} == {name: set() for name in FOUNDATION}


def test_every_module_imports_in_a_fresh_interpreter():
    """One interpreter for all (each costs seconds of torch/transformers imports); with no circle,
    each module also imports alone."""
    code = "; ".join(f"import {name}" for name in MODULES)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_architecture_list_names_every_module_and_only_those():
    page = (ROOT / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"`(lmoe/[\w/]+\.py)`", page))
    files = {str(p.relative_to(ROOT)) for p in MODULES.values()}
    assert listed == files, (
        f"docs/architecture.md: add {sorted(files - listed)}, remove {sorted(listed - files)}"
    )


def test_tests_mirror_the_package():
    """Every folder of tests/ is named after a subpackage of lmoe/ (a test file of its
    modules sits there)."""
    folders = {p.parent.name for p in (ROOT / "tests").rglob("test_*.py")} - {"tests"}
    assert folders and all((PACKAGE / name).is_dir() and name in GROUPS for name in folders), (
        folders
    )
