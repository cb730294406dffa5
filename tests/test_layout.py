"""The package's layout: every module imports in a fresh interpreter, and the modules' top-level
imports of each other form no circle (a circle makes the import order decide what works)."""
import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lmoe"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def top_level_imports(path: Path) -> set[str]:
    """The sibling modules that path imports at module level (`from .x import`; imports inside functions,
    made on first use, cannot close a circle at import time)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
    return {name.split(".")[0] for name in found}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the directed graph as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
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


def test_no_import_circle_between_the_modules():
    graph = {name: top_level_imports(PACKAGE / f"{name}.py") for name in MODULES}
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_every_module_imports_in_a_fresh_interpreter():
    """One interpreter for all (each costs seconds of torch/transformers imports); with no circle, each
    module also imports alone."""
    code = "; ".join(f"import lmoe.{name}" for name in MODULES)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_readme_architecture_list_names_every_module_and_only_those():
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"lmoe/(\w+)\.py", section))
    assert listed == set(MODULES), (f"README.md's Architecture list: add {sorted(set(MODULES) - listed)}, "
                                    f"remove {sorted(listed - set(MODULES))}")
