"""Imports point downward only: the core never imports a backend, methods never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flashar"
CORE = ([p for p in PACKAGE.glob("*.py")] + list((PACKAGE / "adapt").glob("*.py"))
        + list((PACKAGE / "compare").glob("*.py")))

# The layer order, top to bottom: a module imports only from its own layer or lower ones (lazy imports
# included). Backends sit beside the stack: they use the core, and only the core (cli -> api ->
# compare/adapt -> methods -> core <- backends); no layer imports them.
LAYERS = [
    ("cli", ["flashar.cli", "flashar.cliutils", "flashar.__main__"]),
    ("api", ["flashar.api", "flashar.testing"]),
    ("compare/adapt", ["flashar.compare", "flashar.adapt"]),
    ("methods", ["flashar.methods", "flashar.speculative"]),
    ("core", ["flashar"]),
]


def layer_of(module: str) -> int | None:
    """Index into LAYERS (0 = top), or None for a backend or a module outside flashar."""
    if module.startswith("flashar.backends") or not (module == "flashar" or module.startswith("flashar.")):
        return None
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_core_never_imports_a_backend():
    allowed = {"plugins.py"}  # lists the built-in plugin module names as strings only
    offenders = [p.name for p in CORE
                 if p.name not in allowed and any(m.startswith("flashar.backends") for m in imported_modules(p))]
    assert offenders == []


def test_methods_never_import_each_other():
    methods = list((PACKAGE / "methods").glob("*.py"))
    for path in methods:
        others = {f"flashar.methods.{p.stem}" for p in methods if p != path and p.stem != "__init__"}
        assert not imported_modules(path) & others, path.name


def test_importing_flashar_is_cheap():
    import subprocess
    import sys

    heavy = "('transformers', 'torch_fidelity', 'sklearn', 'rich')"
    code = f"import sys, flashar.cli; print(','.join(m for m in {heavy} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""


def test_imports_follow_the_layer_order():
    """Every module of flashar/ outside the backends, methods/ included, imports only downward."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        rank = layer_of(name)
        if rank is None:
            continue
        for imported in imported_modules(path):
            other = layer_of(imported)
            if other is not None and other < rank:
                offenders.append(f"{name} ({LAYERS[rank][0]}) imports {imported} ({LAYERS[other][0]})")
    assert offenders == []


def test_backends_use_only_the_core():
    offenders = []
    for path in (PACKAGE / "backends").rglob("*.py"):
        for imported in imported_modules(path):
            rank = layer_of(imported)
            if rank is not None and LAYERS[rank][0] != "core":
                offenders.append(f"{module_name(path)} imports {imported}")
    assert offenders == []


def test_no_import_circles_in_the_core():
    """adapter, backbone and branch import one another in one direction only (TYPE_CHECKING aside)."""
    import ast as _ast

    graph = {}
    for path in PACKAGE.glob("*.py"):
        tree = _ast.parse(path.read_text())
        type_only = {id(n) for node in _ast.walk(tree)
                     if isinstance(node, _ast.If) and "TYPE_CHECKING" in _ast.unparse(node.test)
                     for n in _ast.walk(node)}
        graph[module_name(path)] = {n.module for n in _ast.walk(tree)
                                    if isinstance(n, _ast.ImportFrom) and n.module and id(n) not in type_only}

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(
            m == goal or (m not in seen and not seen.add(m) and reaches(m, goal, seen)) for m in graph.get(start, ()))

    circles = [m for m in graph if reaches(m, m, set())]
    assert circles == []
