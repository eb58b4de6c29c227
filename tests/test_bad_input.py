"""Bad input through the CLI, table-driven: every case exits non-zero with one error line that names the
problem and what to do, shows no traceback unless --debug, and leaves no file behind."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import TINY_VQ, cli_args, random_gpt, stripes, write_class_folder, write_llamagen
from pydantic import ValidationError

from flashar.adapt.trainer import Run, adapt
from flashar.backends.llamagen.tokenizer import VQConfig, VQModel
from flashar.cli import cli
from flashar.config import AdaptConfig, StageConfig
from flashar.decoding import NoOptions
from flashar.errors import FlashARError
from flashar.plugins import BackendSpec


@dataclass
class World:
    """Valid inputs to break: a tiny LlamaGen in the official format, images, an adapter for it."""

    root: Path
    model: list[str]  # CLI options of the tiny LlamaGen
    options: dict
    images: Path
    adapter: Path
    other: Path  # an adapter for another backbone (other weights)
    out: Path = field(init=False)

    def __post_init__(self):
        self.out = self.root / "out"

    def copy_adapter(self, name: str) -> Path:
        return Path(shutil.copytree(self.adapter, self.root / name))

    def gen(self, *args) -> list:
        return ["generate", "-b", "llamagen", *self.model, "--image-size", 8, "--classes", "1,2", *args]

    def adapt(self, *args, data=None) -> list:
        return ["adapt", "-b", "llamagen", *self.model, "--data", data or self.images, "--image-size", 8,
                "--stage1-steps", 1, "--stage2-steps", 0, "--batch-size", 2, "--cache-dir", self.root / "cache", *args]


def quick_adapter(out: Path, seed: int = 0) -> Path:
    """A stage-1 adapter for the tiny GPT of ``write_llamagen(seed=seed)`` on 4x4 grids (image size 8)."""
    config = AdaptConfig(stage1=StageConfig(steps=2, lr=1e-3), stage2_mode="none", batch_size=4, checkpoint_every=1,
                         keep_checkpoints=True)
    adapt(random_gpt(seed), Run(stripes(), config, out))
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"mine": quick_adapter(root / "mine"), "other": quick_adapter(root / "other", seed=3)}


@pytest.fixture
def world(tmp_path, adapters) -> World:
    options = write_llamagen(tmp_path / "model")
    images = write_class_folder(tmp_path / "images", per_class=2)
    adapter = Path(shutil.copytree(adapters["mine"], tmp_path / "adapter"))
    return World(tmp_path, cli_args(options), options, images, adapter, adapters["other"])


# --- ways to break an input (each returns the CLI arguments) --------------------------------------------
def truncated_checkpoint(w: World) -> list:
    data = Path(w.options["checkpoint"]).read_bytes()
    (w.root / "cut.pt").write_bytes(data[: len(data) // 2])
    return ["generate", "-b", "llamagen", "--checkpoint", w.root / "cut.pt", "--model-config", w.options["config_file"],
            "--classes", 1]


def corrupt_safetensors(w: World) -> list:
    (w.root / "gpt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" + os.urandom(64))
    return ["generate", "-b", "llamagen", "--checkpoint", w.root / "gpt.safetensors", "--classes", 1]


class RunsCode:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def code_execution_pickle(w: World) -> list:
    (w.root / "evil.pt").write_bytes(pickle.dumps({"model": RunsCode(w.root / "pwned")}, protocol=2))
    return ["generate", "-b", "llamagen", "--checkpoint", w.root / "evil.pt", "--classes", 1]


def code_execution_vq(w: World) -> list:
    torch.save({"model": {"quantize.embedding.weight": RunsCode(w.root / "pwned")}}, w.root / "evil-vq.pt")
    return w.gen("--vq-checkpoint", w.root / "evil-vq.pt")


def code_execution_fid_weights(w: World) -> list:
    torch.save({"Conv2d_1a_3x3.conv.weight": RunsCode(w.root / "pwned")}, w.root / "inception.pt")
    return ["compare", "-b", "llamagen", *w.model, "--methods", "raster", "--image-size", 8, "--num-samples", 2,
            "--batch-size", 2, "--repeats", 1, "--warmup", 0, "--fid-weights", w.root / "inception.pt",
            "--reference-images", w.images]


def vq_in_place_of_gpt(w: World) -> list:
    return ["generate", "-b", "llamagen", "--checkpoint", w.options["vq_checkpoint"], "--classes", 1]


def wrong_shape_safetensors(w: World) -> list:
    from safetensors.torch import save_file

    state = random_gpt().state_dict()
    state["output.weight"] = state["output.weight"].reshape(32, 128).contiguous()
    save_file(state, str(w.root / "wrong.safetensors"))
    return ["generate", "-b", "llamagen", "--checkpoint", w.root / "wrong.safetensors", "--model-config",
            w.options["config_file"], "--classes", 1]


def smaller_vq_vocabulary(w: World) -> list:
    config = {**TINY_VQ, "codebook_size": 32}
    torch.save({"model": VQModel(VQConfig(**config)).state_dict()}, w.root / "vq32.pt")
    (w.root / "vq32.json").write_text(json.dumps(config))
    return ["generate", "-b", "llamagen", "--checkpoint", w.options["checkpoint"], "--model-config",
            w.options["config_file"], "--vq-checkpoint", w.root / "vq32.pt", "--vq-config", w.root / "vq32.json",
            "--image-size", 8, "--classes", 1]


def adapter_without_config(w: World) -> list:
    adapter = w.copy_adapter("no-config")
    (adapter / "config.json").unlink()
    return w.gen("--method", "flashar", "--adapter", adapter)


def adapter_config(w: World, text: str | None = None, **changes) -> Path:
    adapter = w.copy_adapter("edited")
    meta = json.loads((adapter / "config.json").read_text())
    (adapter / "config.json").write_text(text if text is not None else json.dumps({**meta, **changes}))
    return adapter


def codes_folder(w: World, high: int) -> Path:
    """LlamaGen extract_codes_c2i.py output whose codes reach ``high``."""
    codes, labels = w.root / "codes" / "imagenet_codes", w.root / "codes" / "imagenet_labels"
    codes.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(4):
        np.save(codes / f"{i}.npy", np.full((1, 1, 16), high if i == 0 else 1, dtype=np.int64))
        np.save(labels / f"{i}.npy", np.array([i % 3]))
    return w.root / "codes"


def codes_with_objects(w: World) -> Path:
    folder = codes_folder(w, 1)
    np.save(folder / "imagenet_codes" / "0.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return folder


def codes_without_a_label(w: World) -> Path:
    folder = codes_folder(w, 1)
    (folder / "imagenet_labels" / "2.npy").unlink()
    return folder


def malformed_resume_state(w: World) -> Path:
    adapter = w.copy_adapter("malformed")
    newest = sorted((adapter / "checkpoints").glob("step-*"))[-1]
    (newest / "state.json").write_text("[1, 2]")
    return adapter


def folder_where_an_image_goes(w: World) -> Path:
    (w.out / "0000_1.png").mkdir(parents=True)
    return w.out


def text_file_as_image(w: World) -> Path:
    (w.images / "0" / "broken.png").write_text("not an image")
    return w.images


def class_folders_without_images(w: World) -> Path:
    for label in ("0", "1"):
        (w.root / "noimg" / label).mkdir(parents=True)
        (w.root / "noimg" / label / "notes.txt").write_text("no images here")
    return w.root / "noimg"


def finished_adapter_folder(w: World) -> Path:
    return w.copy_adapter("done")


def missing_extra(w: World) -> list:
    return ["generate", "-b", "needs-extra", "--classes", 1]


@dataclass
class Case:
    id: str
    args: Callable[[World], list]
    words: tuple[str, ...]
    usage: bool = False  # a click usage error (exit code 2, usage line above the error)
    setup: Callable[[Any, pytest.MonkeyPatch], None] | None = None  # (registry, monkeypatch) before the command


def register_backend_needing_an_extra(registry, monkeypatch) -> None:
    registry.backends["needs-extra"] = BackendSpec(id="needs-extra", description="test", options=NoOptions,
                                                   load=lambda o, r: None, extra="fake",
                                                   requires=("flashar_not_installed",))
    registry.owners[("backend", "needs-extra")] = "test"


def attention_path(name: str) -> Callable[[Any, pytest.MonkeyPatch], None]:
    def setup(registry, monkeypatch) -> None:
        from flashar import attention

        monkeypatch.setattr(attention, "ATTENTION", name)

    return setup


def without_cuda(registry, monkeypatch) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")


def without_peft(registry, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))


CASES = [
    # checkpoints
    Case("truncated-checkpoint", truncated_checkpoint, ("truncated or corrupt", "re-download")),
    Case("corrupt-safetensors", corrupt_safetensors, ("could not read", "safetensors", "corrupt")),
    Case("pickle-needs-code-execution", code_execution_pickle, ("refusing to load", "code execution")),
    Case("vq-pickle-needs-code-execution", code_execution_vq, ("refusing to load", "code execution")),
    Case("fid-weights-pickle-needs-code-execution", code_execution_fid_weights, ("refusing to load", "code execution")),
    Case("vq-checkpoint-as-gpt", vq_in_place_of_gpt, ("not a LlamaGen GPT checkpoint", "--vq-checkpoint")),
    Case("safetensors-wrong-shape", wrong_shape_safetensors, ("wrong shapes", "output.weight")),
    Case("vocabulary-mismatch", smaller_vq_vocabulary, ("32 codes", "64", "--vq-checkpoint")),
    Case("missing-checkpoint-file",
         lambda w: ["generate", "-b", "llamagen", "--checkpoint", w.root / "nope.pt", "--classes", 1],
         ("checkpoint file not found",)),
    # adapters
    Case("adapter-other-backbone", lambda w: w.gen("--method", "flashar", "--adapter", w.other),
         ("made for another backbone", "load the checkpoint")),
    Case("adapter-other-grid", lambda w: w.gen("--method", "flashar", "--adapter", w.adapter, "--image-size", 16),
         ("trained for a 4x4 token grid", "image size 8x8")),
    Case("compare-adapter-other-grid",
         lambda w: ["compare", "-b", "llamagen", *w.model, "--methods", "raster,flashar", "--adapter", w.adapter,
         "--image-size", 16, "--no-metrics", "--out", w.out], ("trained for a 4x4 token grid", "image size 8x8")),
    Case("adapter-without-config", adapter_without_config, ("not a flashar adapter folder", "flashar adapt")),
    Case("adapter-config-not-json", lambda w: w.gen("--method", "flashar", "--adapter", adapter_config(w, "{oops")),
         ("is not valid JSON",)),
    Case("adapter-config-wrong-types",
         lambda w: w.gen("--method", "flashar", "--adapter", adapter_config(w, grid="big")),
         ("not valid adapter metadata", "grid")),
    Case("adapter-other-backend",
         lambda w: w.gen("--method", "flashar", "--adapter", adapter_config(w, backend="digits")),
         ("made for backend 'digits'", "not 'llamagen'")),
    Case("flashar-without-adapter", lambda w: w.gen("--method", "flashar"), ("needs an adapter", "--adapter")),
    Case("adapter-for-raster", lambda w: w.gen("--adapter", w.adapter),
         ("--adapter", "method 'flashar'", "not selected")),
    # names and extras
    Case("unknown-backend", lambda w: ["generate", "-b", "llamgen", "--classes", 1],
         ("unknown backend 'llamgen'", "flashar backends")),
    Case("unknown-method", lambda w: w.gen("--method", "nope"), ("unknown method 'nope'", "flashar methods")),
    Case("compare-unknown-method",
         lambda w: ["compare", "-b", "llamagen", *w.model, "--methods", "raster,nope", "--no-metrics"],
         ("unknown method 'nope'",)),
    Case("missing-extra", missing_extra, ("needs flashar_not_installed", "pip install 'flashar[fake]'"),
         setup=register_backend_needing_an_extra),
    # config values
    Case("top-p-zero", lambda w: w.gen("--top-p", 0), ("top_p", "--top-p", "greater than 0")),
    Case("stage-option-names-its-flag", lambda w: w.adapt("--out", w.out, "--stage1-lr", -1),
         ("--stage1-lr", "greater than 0")),
    Case("cfg-scale-inf", lambda w: w.gen("--cfg-scale", "inf"), ("--cfg-scale", "finite number")),
    Case("cfg-scale-nan", lambda w: w.gen("--cfg-scale", "nan"), ("--cfg-scale", "finite number")),
    Case("seed-beyond-64-bits", lambda w: w.gen("--seed", 2**64), ("--seed", "less than")),
    Case("compare-seed-beyond-64-bits",
         lambda w: ["compare", "-b", "llamagen", *w.model, "--seeds", f"0,{2**70}", "--no-metrics"],
         ("--seeds", "less than")),
    Case("compare-no-methods", lambda w: ["compare", "-b", "llamagen", *w.model, "--methods", ",", "--no-metrics"],
         ("--methods", "at least one"), usage=True),
    Case("classes-with-an-empty-entry", lambda w: w.gen("--classes", "1,,2"), ("comma-separated integers", "'1,,2'"),
         usage=True),
    Case("compare-no-seeds", lambda w: ["compare", "-b", "llamagen", *w.model, "--seeds", ",", "--no-metrics"],
         ("--seeds", "at least one"), usage=True),
    Case("negative-temperature", lambda w: w.gen("--temperature", -1), ("temperature", "greater than or equal to 0")),
    Case("cfg-interval-below-minus-one", lambda w: w.gen("--cfg-interval", -2), ("cfg_interval", "-1")),
    Case("generate-batch-size-zero", lambda w: w.gen("--batch-size", 0), ("--batch-size", "0"), usage=True),
    Case("adapt-batch-size-zero", lambda w: w.adapt("--out", w.out, "--batch-size", 0),
         ("batch_size", "greater than 0")),
    Case("batch-not-multiple-of-accum", lambda w: w.adapt("--out", w.out, "--batch-size", 3, "--grad-accum", 2),
         ("multiple of grad_accum",)),
    Case("unknown-dtype", lambda w: w.gen("--dtype", "float8"), ("--dtype", "float8"), usage=True),
    Case("config-file-not-json", lambda w: w.adapt("--out", w.out, "--config", write(w.root / "c.json", "stage1: {")),
         ("is not valid JSON",)),
    Case("config-file-not-an-object", lambda w: w.adapt("--out", w.out, "--config", write(w.root / "c.json", "[1, 2]")),
         ("must hold a JSON object",)),
    Case("config-file-stage-not-an-object",
         lambda w: w.adapt("--out", w.out, "--config", write(w.root / "c.json", '{"stage1": 3}')),
         ("stage1", "JSON object")),
    Case(
        "config-file-is-a-folder", lambda w: w.gen("--config", mkdir(w.root / "c.json")), ("is a folder", "JSON file")),
    Case("adapt-config-file-is-a-folder", lambda w: w.adapt("--out", w.out, "--config", mkdir(w.root / "c.json")),
         ("is a folder", "JSON file")),
    Case("config-file-unknown-option", lambda w: w.gen("--config", write(w.root / "c.json", '{"top_q": 0.5}')),
         ("unknown option 'top_q'",)),
    Case("save-tokens-not-npy", lambda w: w.gen("--out", w.out, "--save-tokens", w.root / "tokens.txt"),
         ("--save-tokens", ".npy")),
    Case("save-tokens-is-a-folder", lambda w: w.gen("--out", w.out, "--save-tokens", mkdir(w.root / "t.npy")),
         ("--save-tokens", "is a folder")),
    Case("unknown-attention-path", lambda w: w.gen(), ("FLASHAR_ATTENTION='fast'", "auto, math, sdpa, flex"),
         setup=attention_path("fast")),
    Case("flex-attention-compiled-on-cpu", lambda w: w.gen("--compile"), ("FLASHAR_ATTENTION=flex", "CUDA only"),
         setup=attention_path("flex")),
    Case("device-cuda-without-cuda", lambda w: w.gen("--device", "cuda"), ("CUDA is not available", "--device cpu"),
         setup=without_cuda),
    Case("unknown-device", lambda w: w.gen("--device", "tpu9"), ("unknown device 'tpu9'",)),
    # conditions and sizes
    Case("class-id-out-of-range", lambda w: w.gen("--classes", "99"), ("class id 99 is out of range", "[0, 10)")),
    Case("classes-not-integers", lambda w: w.gen("--classes", "cat"), ("comma-separated integers",), usage=True),
    Case("prompts-for-class-backend", lambda w: ["generate", "-b", "llamagen", *w.model, "--prompt", "a cat"],
         ("class-conditional", "--classes")),
    Case("nothing-to-generate", lambda w: ["generate", "-b", "llamagen", *w.model],
         ("nothing to generate", "--classes")),
    Case("generate-size-not-divisible", lambda w: w.gen("--image-size", 7),
         ("not a positive multiple", "downsampling factor 2")),
    Case("generate-size-zero", lambda w: w.gen("--image-size", 0), ("--image-size", "positive pixel size", "'0'"),
         usage=True),
    Case("adapt-size-zero", lambda w: w.adapt("--out", w.out, "--image-size", 0),
         ("--image-size", "positive pixel size", "'0'"), usage=True),
    Case(
        "adapt-size-not-divisible", lambda w: w.adapt("--out", w.out, "--image-size", 7), ("not a positive multiple",)),
    Case(
        "adapt-grid-too-small", lambda w: w.adapt("--out", w.out, "--image-size", 2), ("at least 2x2", "--image-size")),
    # data
    Case("empty-data-folder", lambda w: w.adapt("--out", w.out, data=mkdir(w.root / "empty")),
         ("no images found", "subfolder")),
    Case("data-folder-is-a-file", lambda w: w.adapt("--out", w.out, data=write(w.root / "data.txt", "x")),
         ("not a folder",)),
    Case("data-folder-missing", lambda w: w.adapt("--out", w.out, data=w.root / "nowhere"), ("data folder not found",)),
    Case("image-not-an-image", lambda w: w.adapt("--out", w.out, data=text_file_as_image(w)),
         ("cannot read image", "broken.png")),
    Case("class-folders-without-images", lambda w: w.adapt("--out", w.out, data=class_folders_without_images(w)),
         ("no images found",)),
    Case("class-id-in-data-out-of-range",
         lambda w: w.adapt("--out", w.out, data=mkdir(w.root / "big" / "12", image=True)),
         ("class ids in [0, 10)", "12")),
    Case("codes-outside-vocabulary",
         lambda w: ["adapt", "-b", "llamagen", *w.model, "--codes", codes_folder(w, 70), "--out", w.out],
         ("code 70", "codebook [0, 64)")),
    Case("codes-object-array",
         lambda w: ["adapt", "-b", "llamagen", *w.model, "--codes", codes_with_objects(w), "--out", w.out],
         ("cannot read codes file", "numeric .npy")),
    Case("codes-label-missing",
         lambda w: ["adapt", "-b", "llamagen", *w.model, "--codes", codes_without_a_label(w), "--out", w.out],
         ("label file", "2.npy", "is missing")),
    Case("cache-dir-is-a-file", lambda w: w.adapt("--out", w.out, "--cache-dir", write(w.root / "cachefile", "x")),
         ("--cache-dir", "is a file")),
    Case("data-and-codes", lambda w: w.adapt("--out", w.out, "--codes", w.root), ("exactly one of --data",)),
    # outputs and resume
    Case("generate-out-under-a-file", lambda w: w.gen("--out", write(w.root / "file", "x") / "sub"),
         ("cannot write to", "is a file", "--out")),
    Case("adapt-out-under-a-file", lambda w: w.adapt("--out", write(w.root / "file", "x") / "sub"),
         ("cannot write to", "is a file", "--out")),
    Case("generate-out-holds-a-folder-named-like-an-image", lambda w: w.gen("--out", folder_where_an_image_goes(w)),
         ("is a folder where an image", "--out")),
    Case("resume-malformed-state", lambda w: w.adapt("--out", malformed_resume_state(w), "--resume"),
         ("state.json", "delete")),
    Case("resume-without-checkpoint", lambda w: w.adapt("--out", w.out, "--resume"),
         ("holds no checkpoint", "without --resume")),
    Case("out-holds-an-adapter", lambda w: w.adapt("--out", finished_adapter_folder(w)),
         ("already holds an adapter", "--resume")),
    Case("resume-with-other-config", lambda w: w.adapt("--out", finished_adapter_folder(w), "--resume"),
         ("different adaptation config", "same options")),
    Case("lora-without-peft", lambda w: w.adapt("--out", w.out, "--stage2-mode", "lora", "--stage2-steps", 1),
         ("peft", "pip install 'flashar[lora]'"), setup=without_peft),
]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def mkdir(path: Path, image: bool = False) -> Path:
    path.mkdir(parents=True)
    if image:
        from PIL import Image

        Image.new("RGB", (8, 8)).save(path / "0.png")
        return path.parent
    return path


def snapshot(root: Path) -> set[Path]:
    """Every file and folder under ``root`` except the token cache (not an output)."""
    return {p for p in root.rglob("*") if "cache" not in p.relative_to(root).parts}


def prepare(case: Case, world: World, registry, monkeypatch) -> list[str]:
    if case.setup is not None:
        case.setup(registry, monkeypatch)
    return [str(a) for a in case.args(world)]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_cleanly(case, world, registry, monkeypatch):
    args = prepare(case, world, registry, monkeypatch)
    before = snapshot(world.root)
    result = CliRunner().invoke(cli, args, obj=registry)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == (2 if case.usage else 1), result.output
    assert len(errors) == 1, result.output
    assert all(word in errors[0] for word in case.words), errors[0]
    assert "Traceback" not in result.output
    assert snapshot(world.root) == before, "files were left behind"


@pytest.mark.parametrize("case", [c for c in CASES if not c.usage], ids=[c.id for c in CASES if not c.usage])
def test_debug_raises_the_original_error(case, world, registry, monkeypatch):
    args = prepare(case, world, registry, monkeypatch)
    result = CliRunner().invoke(cli, ["--debug", *args], obj=registry)
    assert result.exit_code != 0
    assert isinstance(result.exception, (FlashARError, ValidationError)), repr(result.exception)


@pytest.mark.parametrize(
    "case", [c for c in CASES if "code-execution" in c.id], ids=[c.id for c in CASES if "code-execution" in c.id])
def test_no_user_file_runs_code(case, world, registry, monkeypatch):
    args = prepare(case, world, registry, monkeypatch)
    result = CliRunner().invoke(cli, args, obj=registry)
    assert result.exit_code == 1 and not (world.root / "pwned").exists(), result.output


def test_a_real_process_exits_1_with_one_line_on_stderr(world):
    args = [str(a) for a in truncated_checkpoint(world)]
    plain = subprocess.run([sys.executable, "-m", "flashar", *args], capture_output=True, text=True)
    assert plain.returncode == 1
    assert plain.stderr.strip().splitlines() == [plain.stderr.strip()]
    assert plain.stderr.startswith("Error: could not read") and "Traceback" not in plain.stderr
    debug = subprocess.run([sys.executable, "-m", "flashar", "--debug", *args], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr


def test_resume_from_a_state_without_sampler_fails_in_one_line(tmp_path):
    out = quick_adapter(tmp_path / "run")
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    state = json.loads((newest / "state.json").read_text())
    (newest / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "sampler"}))
    config = AdaptConfig(stage1=StageConfig(steps=2, lr=1e-3), stage2_mode="none", batch_size=4, checkpoint_every=1)
    with pytest.raises(FlashARError, match="state.json is malformed"):
        adapt(random_gpt(), Run(stripes(), config, out), resume=True)


def test_a_second_adapt_on_the_same_out_is_refused(world, registry):
    """While one run holds --out, another exits 1 in one line and writes nothing there."""
    from flashar.io import folder_lock

    world.out.mkdir()
    with folder_lock(world.out):  # the first run, still training
        result = CliRunner().invoke(cli, [str(a) for a in world.adapt("--out", world.out)], obj=registry)
    assert result.exit_code == 1, result.output
    assert "another flashar adapt is writing to" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in world.out.iterdir()) == [".flashar.lock"]


def test_resume_on_other_data_is_refused_unless_forced(world, registry):
    run = lambda *extra, data=None: CliRunner().invoke(
        cli, [str(a) for a in world.adapt("--out", world.out, "--keep-checkpoints", *extra, data=data)], obj=registry)
    assert run().exit_code == 0
    other = write_class_folder(world.root / "other-images", per_class=3)
    refused = run("--resume", data=other)
    assert refused.exit_code == 1 and "other data" in refused.output and "--force-resume" in refused.output, (
        refused.output)
    assert run("--resume", "--stage1-lr", 0.5).exit_code == 1  # other settings: refused too
    forced = run("--resume", "--force-resume", data=other)
    assert forced.exit_code == 0, forced.output
