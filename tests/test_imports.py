"""Imports flow one way: launch, convert -> pretrain -> model -> {parallel, data} -> kernels.

Every import statement of the project's packages counts, those inside functions and under
`if TYPE_CHECKING:` included (a deferred import is still a dependency). A module may import
modules of its own unit (the longest prefix in RANKS) and modules of lower rank; units of one
rank are independent of each other. The module graph has no cycles. docs/architecture.md draws
this graph; `python tests/test_imports.py` prints the drawing to paste there.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("launch", "convert", "pretrain", "model", "parallel", "data")

UNITS = {
    # kernels: Triton kernels and their launchers, on torch, triton and megatron-core alone
    "model.msa.ops": "kernels",
    "model.triton_support": "kernels",
    "model.rope": "kernels",
    "model.moe_permute": "kernels",
    # where a model runs, and what it reads
    "parallel": "parallel",
    "data": "data",
    # what is computed
    "model": "model",
    # the training run
    "pretrain": "pretrain",
    # what starts runs, and what moves weights in and out
    "launch": "launch",
    "convert": "convert",
}
"""Module-name prefix -> unit; a module belongs to the unit of its longest prefix here."""
RANKS = {"kernels": 0, "parallel": 1, "data": 1, "model": 2, "pretrain": 3, "launch": 4, "convert": 4}


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the project's packages."""
    out = {}
    for package in PACKAGES:
        root = REPO / package
        for path in sorted(root.rglob("*.py")) if root.is_dir() else ():
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, anywhere in its file. `from P import X` counts as
    P.X when that is a module, else as P; a package's own submodules imported by the package
    are edges like any other."""
    is_package = path.name == "__init__.py"
    base = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` depends on a.b.c (and runs the packages above it, which are ours too
            # but import nothing of consequence); keep the deepest project module named.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def unit_of(module: str) -> str:
    """The unit of `module`'s longest prefix in UNITS."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in UNITS:
            return UNITS[prefix]
    raise AssertionError(f"{module} is in no unit: add its package to UNITS")


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(edges.items()):
        unit = unit_of(module)
        for target in sorted(targets):
            other = unit_of(target)
            if other != unit and RANKS[other] >= RANKS[unit]:
                bad.append(f"{module} ({unit}, rank {RANKS[unit]}) imports {target} ({other}, rank {RANKS[other]})")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and self-loops."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def mermaid(edges: dict[str, set[str]]) -> str:
    """The unit-level graph as a mermaid flowchart (units as nodes, an arrow per importing pair)."""
    pairs = sorted({(unit_of(m), unit_of(t)) for m, ts in edges.items() for t in ts if unit_of(m) != unit_of(t)})
    lines = ["flowchart TD"]
    lines += [f"    {a} --> {b}" for a, b in pairs]
    return "\n".join(lines)


def test_every_module_has_a_unit():
    for module in project_modules():
        unit_of(module)


def test_imports_flow_one_way():
    bad = violations(graph())
    assert not bad, "imports against the layering (move the code down, or pass values in):\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, f"import cycles: {found}"


def test_the_checker_sees_violations_and_cycles():
    """The checks fail where they should: an upward import and a two-module cycle."""
    edges = {"parallel.setup": {"model.config"}, "model.config": set(), "model.a": {"model.b"}, "model.b": {"model.a"}}
    assert violations(edges) == ["parallel.setup (parallel, rank 1) imports model.config (model, rank 2)"]
    assert cycles(edges) == [["model.a", "model.b"]]
    modules = project_modules()
    deferred = "def f():\n    from pretrain.config import RunConfig\nif TYPE_CHECKING:\n    import launch.compose\n"
    tmp = REPO / "model" / "_imports_probe.py"
    try:
        tmp.write_text(deferred)
        found = imports_of("model._imports_probe", tmp, {**modules, "model._imports_probe": tmp})
    finally:
        tmp.unlink()
    assert found == {"pretrain.config", "launch.compose"}


def test_architecture_doc_draws_the_real_imports():
    doc = (REPO / "docs" / "architecture.md").read_text()
    drawing = mermaid(graph())
    assert f"```mermaid\n{drawing}\n```" in doc, (
        "docs/architecture.md's import graph is stale: replace its mermaid block with the output of "
        f"`python tests/test_imports.py`:\n{drawing}"
    )


if __name__ == "__main__":
    print(mermaid(graph()))
