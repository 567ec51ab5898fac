"""The pack's import structure, read from the source (``ast``; nothing is imported, no ComfyUI needed).

* The intra-package imports of ``vp2p/`` and ``nodes/`` form no cycle: module-level and
  function-level relative imports alike (``from .x import``, ``from ..vp2p.y import``, ``from . import z``).
  A function-level import that closes a cycle works only by the order modules happen to load in; a
  shared name gets one home that both sides import instead (e.g. ``nodes/edit_inputs.py``).
* ``vp2p/`` imports no ComfyUI module, anywhere (DESIGN §2: the algorithms are host-agnostic), and not
  the pack's ComfyUI glue (``nodes/``) either.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vp2p", "nodes")
# ComfyUI's top-level modules and packages (a vp2p module importing any of them needs ComfyUI).
COMFY_MODULES = ("comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "node_helpers", "latent_preview",
                 "nodes", "server", "execution")

Graph = dict[str, list[tuple[str, int]]]  # module → [(imported module, line)]


def pack_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name (``vp2p.edit``, ``nodes``) → file, for every module of the packages."""
    found: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _package_of(name: str, path: Path) -> list[str]:
    """The package a module's relative imports start from (a package's ``__init__`` is its own)."""
    parts = name.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def relative_imports(name: str, path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """The pack modules ``name`` imports relatively, anywhere in the file (module level, functions, classes)."""
    package = _package_of(name, path)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        up = node.level - 1
        if up > len(package):
            continue  # above the repository's root: no module of these packages
        base = package[: len(package) - up]
        if node.module:
            base = base + node.module.split(".")
        for alias in node.names:
            sub = ".".join(base + [alias.name])
            target = sub if sub in modules else ".".join(base)  # `from . import z` names a module or a name of the package
            if target in modules and target != name:
                yield target, node.lineno


def import_graph(root: Path = ROOT) -> Graph:
    modules = pack_modules(root)
    return {name: sorted(set(relative_imports(name, path, modules))) for name, path in modules.items()}


def find_cycle(graph: Graph) -> Optional[list[tuple[str, int]]]:
    """One import cycle as [(module, line of its import of the next module), …] back to the first; None if none."""
    white, grey, black = 0, 1, 2
    colour = {m: white for m in graph}
    stack: list[tuple[str, int]] = []

    def visit(module: str) -> Optional[list[tuple[str, int]]]:
        colour[module] = grey
        for target, line in graph.get(module, []):
            stack.append((module, line))
            if colour.get(target, black) == grey:
                start = next(i for i, (m, _) in enumerate(stack) if m == target)
                return stack[start:]
            if colour.get(target) == white:
                cycle = visit(target)
                if cycle:
                    return cycle
            stack.pop()
        colour[module] = black
        return None

    for module in sorted(graph):
        if colour[module] == white:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def describe(cycle: list[tuple[str, int]]) -> str:
    return " → ".join(f"{m} (line {line})" for m, line in cycle) + f" → {cycle[0][0]}"


def test_the_graph_sees_module_and_function_level_imports():
    graph = import_graph()
    assert {"vp2p.edit", "nodes.p2p_host", "nodes.edit_inputs"} <= graph.keys()
    edges = {m: {t for t, _ in es} for m, es in graph.items()}
    assert "vp2p.edit" in edges["nodes.p2p_host"]  # module level, `from ..vp2p.edit import`
    assert "vp2p.errors" in edges["vp2p.edit"]  # module level, `from .errors import`
    assert "nodes.edit_inputs" in edges["nodes.p2p_nodes"]  # inside AttentionMaps.execute
    assert "vp2p.errors" in edges["vp2p"]  # a package's __init__ imports from itself


def test_find_cycle_reports_the_cycle():
    graph: Graph = {"a": [("b", 3)], "b": [("c", 7)], "c": [("a", 11), ("d", 12)], "d": []}
    assert describe(find_cycle(graph)) == "a (line 3) → b (line 7) → c (line 11) → a"
    assert find_cycle({"a": [("b", 1)], "b": [], "c": [("a", 2)]}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, (
        f"import cycle: {describe(cycle)}. Give the shared names one module that both sides import "
        "(a function-level import does not remove the cycle)."
    )


def absolute_imports(path: Path) -> Iterator[tuple[str, int]]:
    """The modules a file imports absolutely, anywhere in it (``import x``, ``from x import``, ``import_module("x")``)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node.lineno
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            yield node.args[0].value, node.lineno


def test_vp2p_imports_no_comfyui():
    modules, graph = pack_modules(), import_graph()
    offenders = []
    for name, path in modules.items():
        if name.split(".")[0] != "vp2p":
            continue
        where = path.relative_to(ROOT)
        offenders += [f"{where}:{line} imports {target}" for target, line in absolute_imports(path)
                      if target.split(".")[0] in COMFY_MODULES]
        offenders += [f"{where}:{line} imports the ComfyUI glue {target}" for target, line in graph[name]
                      if target.split(".")[0] == "nodes"]
    assert not offenders, "vp2p/ must not import ComfyUI (DESIGN §2):\n" + "\n".join(offenders)
