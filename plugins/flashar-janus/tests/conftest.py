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


@pytest.fixture(scope="session")
def janus_folder(tmp_path_factory):
    """One tiny random Janus save_pretrained folder shared by the session (writing it takes seconds)."""
    from tiny_janus import write_tiny_janus

    return write_tiny_janus(tmp_path_factory.mktemp("janus"))


@pytest.fixture
def registry():
    """The built-ins plus this plugin, registered directly (installed entry points are not loaded)."""
    import flashar_janus
    from flashar.plugins import Registry, build_manager

    pm, infos = build_manager(load_entry_points=False)
    pm.register(flashar_janus, name="janus")
    return Registry.from_manager(pm, infos)
