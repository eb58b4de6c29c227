"""The CLI reference in docs/cli.md is generated from the CLI and must be current."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_cli_reference_is_regenerated():
    spec = importlib.util.spec_from_file_location("generate_cli_docs", DOCS / "generate_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (DOCS / "cli.md").read_text() == module.render(), "run: python docs/generate_cli_docs.py"
