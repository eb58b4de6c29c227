"""No file a user passes can execute code: every loader reads weights without unpickling code, and the
paths that a folder's files name (shard indexes, metadata.jsonl) stay inside that folder. The CLI-level cases
(--checkpoint, --vq-checkpoint, --fid-weights) are in test_bad_input.py."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from helpers import write_ibq

from flashar.errors import CheckpointError, DataError

ROOT = Path(__file__).parents[1]


class RunsCode:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def random_inception_state() -> dict[str, torch.Tensor]:
    """torch-fidelity's Inception with random weights (its constructor otherwise downloads them)."""
    from torch_fidelity import feature_extractor_inceptionv3 as module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        return module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_inception_weights_load_from_a_tensor_pickle_or_safetensors(tmp_path, suffix):
    from safetensors.torch import save_file
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from flashar.compare.metrics import inception_extractor

    state = random_inception_state()
    path = tmp_path / f"inception{suffix}"
    torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))
    extractor = inception_extractor(path)
    network = FEATURE_EXTRACTORS_REGISTRY[extractor.name](extractor.name, ["2048"], **extractor.kwargs)
    loaded = network.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_inception_weights_with_code_are_refused(tmp_path):
    from flashar.compare.metrics import inception_extractor

    torch.save({"Conv2d_1a_3x3.conv.weight": RunsCode(tmp_path / "pwned")}, tmp_path / "inception.pt")
    with pytest.raises(CheckpointError, match="code execution"):
        inception_extractor(tmp_path / "inception.pt")
    assert not (tmp_path / "pwned").exists()


def test_inception_weights_of_another_network_are_refused(tmp_path):
    from flashar.compare.metrics import inception_extractor

    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="Inception weights"):
        inception_extractor(tmp_path / "other.pt")


def test_ibq_checkpoint_with_code_is_refused(tmp_path):
    from flashar.backends.emu35.loader import load_vision

    folder = write_ibq(tmp_path / "vq", layout="ckpt")
    torch.save({"state_dict": {"quantize.embedding.weight": RunsCode(tmp_path / "pwned")}}, folder / "model.ckpt")
    with pytest.raises(CheckpointError, match="code execution"):
        load_vision(folder)
    assert not (tmp_path / "pwned").exists()


# Calls that can run code from a file (torch.load only without weights_only=True).
UNSAFE_CALLS = {"torch.jit.load", "pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "eval", "exec",
                "marshal.load", "marshal.loads", "dill.load", "joblib.load"}
UNSAFE_KEYWORDS = {("weights_only", False), ("allow_pickle", True), ("trust_remote_code", True)}


def unsafe_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {(k.arg, k.value.value) for k in node.keywords if isinstance(k.value, ast.Constant)}
        torch_pickle = name == "torch.load" and ("weights_only", True) not in keywords
        if name in UNSAFE_CALLS or torch_pickle or keywords & UNSAFE_KEYWORDS:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_no_loader_outside_flashar_io_can_run_code():
    sources = [p for folder in ("flashar", "plugins", "benchmarks") for p in sorted((ROOT / folder).rglob("*.py"))]
    found = [call for path in sources for call in unsafe_calls(path)]
    assert found == []


LEAVING = ["../outside.safetensors", "/etc/outside.safetensors", "sub/../../outside.safetensors"]


def write_index(folder: Path, shard: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    return folder


@pytest.mark.parametrize("shard", LEAVING)
def test_emu35_index_cannot_name_a_shard_outside_the_folder(tmp_path, shard):
    from flashar.backends.emu35.loader import shard_map

    with pytest.raises(CheckpointError, match="not inside"):
        shard_map(write_index(tmp_path / "model", shard))


@pytest.mark.parametrize("shard", LEAVING)
def test_janus_index_cannot_name_a_shard_outside_the_folder(tmp_path, shard):
    from flashar_janus.loader import weight_files

    with pytest.raises(CheckpointError, match="not inside"):
        weight_files(write_index(tmp_path / "model", shard))


@pytest.mark.parametrize("name", ["../outside.png", "/tmp/outside.png"])
def test_caption_metadata_cannot_name_an_image_outside_the_folder(tmp_path, name):
    from flashar.adapt.data import list_images

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "a cat"}) + "\n")
    with pytest.raises(DataError, match="not inside"):
        list_images(tmp_path / "data", "text")
