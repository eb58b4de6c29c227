"""Imports point downward only: the core never imports a backend, methods never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flashar"
CORE = [p for p in PACKAGE.glob("*.py")] + list((PACKAGE / "adapt").glob("*.py")) + list((PACKAGE / "compare").glob("*.py"))


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
    offenders = [p.name for p in CORE if p.name not in allowed and any(m.startswith("flashar.backends") for m in imported_modules(p))]
    assert offenders == []


def test_methods_never_import_each_other():
    methods = list((PACKAGE / "methods").glob("*.py"))
    for path in methods:
        others = {f"flashar.methods.{p.stem}" for p in methods if p != path and p.stem != "__init__"}
        assert not imported_modules(path) & others, path.name


def test_importing_flashar_is_cheap():
    import subprocess
    import sys

    code = "import sys, flashar.cli; print(','.join(m for m in ('transformers', 'torch_fidelity', 'sklearn', 'rich') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""
