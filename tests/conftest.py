import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture
def registry():
    """A fresh plugin registry with the built-ins only (installed entry points are not loaded)."""
    from flashar.plugins import Registry, build_manager

    pm, infos = build_manager(load_entry_points=False)
    return Registry.from_manager(pm, infos)
