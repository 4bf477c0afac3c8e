"""The layout stays what docs/architecture.md says: every module of pipeline/ named there, and no import
cycle between modules or packages (every import read, local ones included, so none hides a cycle)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pipeline"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Module -> the pipeline modules it imports (``from pipeline.data import plan`` counts as plan)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    is_module = (REPO / (full.replace(".", "/") + ".py")).exists()
                    deps.add(full if is_module else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("pipeline.")}
        graph[module_name(path)] = deps - {module_name(path)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_modules_or_packages():
    graph = import_graph()
    assert cycles(graph) == []
    packages: dict[str, set[str]] = {}
    for module, deps in graph.items():
        packages.setdefault(package_of(module), set()).update(
            package_of(d) for d in deps if package_of(d) != package_of(module) and package_of(d) != "pipeline"
        )
    assert cycles(packages) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_docs_architecture_names_every_module_and_no_other():
    doc = (REPO / "docs" / "architecture.md").read_text()
    block = doc[doc.index("## Layout"):doc.index("## Where to change what")]
    named, stack = set(), []
    for line in block.splitlines():
        m = re.match(r"^( *)([\w.]+(?:/|\.py))\s", line + " ")
        if m:
            stack = stack[: len(m.group(1)) // 2] + [m.group(2)]
            if m.group(2).endswith(".py") and stack[0] == "pipeline/":
                named.add("".join(stack))
    tree = {str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert tree - named == set(), "modules docs/architecture.md does not name"
    assert named - tree == set(), "modules docs/architecture.md names that do not exist"
