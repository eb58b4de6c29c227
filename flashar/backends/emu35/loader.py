"""Published Emu3.5 files -> flashar modules (reference/emu35_glm.md §2, §3, §8, §9.1).

* Language model: ``config.json`` (``model_type: "Emu3"``, ``architectures: ["Emu3ForCausalLM"]``) becomes a
  transformers ``Qwen3Config``; the bf16 safetensors shards listed in ``model.safetensors.index.json`` (or one
  ``model.safetensors``) are checked key by key and shape by shape against a backbone built on ``meta``,
  then assigned tensor by tensor, cast to the requested dtype on the device that holds that tensor.
* Text tokenizer: ``emu3.tiktoken`` + ``emu3_vision_tokens.txt`` (:mod:`.text`).
* IBQ vision tokenizer: ``config.json`` + ``model.safetensors`` (transformers layout) or ``config.yaml`` +
  ``model.ckpt`` (the reference loader's layout, read with ``torch.load(weights_only=True)``), always float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from flashar.backends.emu35.backbone import Emu35Backbone
from flashar.backends.emu35.placement import Placement
from flashar.backends.emu35.text import Emu35TextTokenizer
from flashar.backends.emu35.tokenizer import IBQ, IBQConfig, IBQTokenizer
from flashar.errors import CheckpointError, require
from flashar.io import check_keys, file_in, load_json, load_weights, select_state_dict, strip_prefixes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Defaults of the reference Emu3Config for fields a config.json may omit (note rms_norm_eps 1e-5, not Qwen3's 1e-6).
EMU3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 184622, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": 128, "hidden_act": "silu",
    "max_position_embeddings": 9216, "rms_norm_eps": 1e-5, "rope_theta": 1_000_000.0, "rope_scaling": None,
    "pad_token_id": 151643,
}


def qwen3_config(raw: dict[str, Any], path: str | Path):
    """An Emu3.5 ``config.json`` dict -> the equivalent transformers ``Qwen3Config`` (biases off, untied head)."""
    from transformers import Qwen3Config

    if raw.get("model_type") == "emu3_flashar":
        raise CheckpointError(f"{path} belongs to a FlashAR checkpoint (model_type 'emu3_flashar'); pass its folder as "
                              "--adapter with --method flashar, and the base Emu3.5-Image folder as --model-path")
    if raw.get("model_type") != "Emu3" or "Emu3ForCausalLM" not in raw.get("architectures", []):
        raise CheckpointError(
            f"{path} is not an Emu3.5 language-model config (model_type {raw.get('model_type')!r}, architectures "
            f"{raw.get('architectures')!r}; expected 'Emu3' / ['Emu3ForCausalLM']); "
            f"pass the Emu3.5(-Image) folder as --model-path"
        )
    if raw.get("tie_word_embeddings"):
        raise CheckpointError(f"{path} ties the word embeddings; Emu3.5 publishes an untied lm_head")
    values = {key: raw.get(key, default) for key, default in EMU3_DEFAULTS.items()}
    scaling = values.pop("rope_scaling")
    if scaling is not None and scaling.get("type", scaling.get("rope_type")) != "linear":
        raise CheckpointError(
            f"{path} sets rope_scaling {scaling}; flashar supports none (as published) or linear scaling")
    values["num_key_value_heads"] = values["num_key_value_heads"] or values["num_attention_heads"]
    rope = {"rope_type": "default", "rope_theta": values.pop("rope_theta")}
    if scaling is not None:
        rope.update(rope_type="linear", factor=float(scaling["factor"]))
    return Qwen3Config(**values, rope_parameters=rope, attention_bias=False, tie_word_embeddings=False,
                       attention_dropout=0.0, use_sliding_window=False)


def shard_map(folder: Path, hint: str = "pass the Emu3.5(-Image) folder as --model-path") -> dict[str, Path]:
    """Every parameter name -> the shard file that holds it, from the index (or the single file)."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = load_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'; re-download the checkpoint index")
        files = {name: file_in(folder, name, index) for name in set(weight_map.values())}
        if missing := sorted(name for name, path in files.items() if not path.is_file()):
            raise CheckpointError(f"{index} lists shards that are not in {folder}: {', '.join(missing[:4])}; "
                                  "download every shard")
        return {key: files[name] for key, name in weight_map.items()}
    if (folder / SINGLE_FILE).is_file():
        from safetensors import safe_open

        with safe_open(str(folder / SINGLE_FILE), framework="pt") as f:
            return {key: folder / SINGLE_FILE for key in f.keys()}
    raise CheckpointError(f"no {INDEX_FILE} or {SINGLE_FILE} in {folder}; {hint}")


def shard_shapes(shards: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Shape-only (meta) tensors for every key, read from the shard headers; checks the index against them."""
    from safetensors import safe_open

    shapes = {}
    for path in sorted(set(shards.values())):
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            for key in (k for k, p in shards.items() if p == path):
                if key not in present:
                    raise CheckpointError(f"the index puts {key} in {path.name}, which does not hold it; "
                                          "re-download the checkpoint")
                shapes[key] = torch.empty(f.get_slice(key).get_shape(), device="meta")
    return shapes


def iter_shard_tensors(shards: dict[str, Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (key, CPU tensor) of the shards, read one tensor at a time from memory-mapped files."""
    from safetensors import safe_open

    for path in sorted(set(shards.values())):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in (k for k, p in shards.items() if p == path):
                yield key, f.get_tensor(key)


def load_shards(shards: dict[str, Path], dtype: torch.dtype, placement: Placement) -> dict[str, torch.Tensor]:
    """Read every tensor once (memory-mapped) and cast it on the device that will hold it."""
    return {key: t.to(device=placement.device_of(key), dtype=dtype) for key, t in iter_shard_tensors(shards)}


def load_language_model(folder: str | Path, dtype: torch.dtype, placement: Placement, text: Emu35TextTokenizer,
                        vision: IBQTokenizer | None = None, text_max_length: int | None = 128,
                        prefix_padding: str = "right") -> Emu35Backbone:
    """The backbone from a published Emu3.5 folder: config, strict key/shape check, shards on their devices."""
    folder = Path(folder)
    config = qwen3_config(load_json(folder / "config.json"), folder / "config.json")
    check_vocabulary(config, text, folder)
    shards = shard_map(folder)
    placement.plan(config.num_hidden_layers)
    with torch.device("meta"):
        model = Emu35Backbone(config, text=text, vision=vision, text_max_length=text_max_length,
                              prefix_padding=prefix_padding, placement=placement)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(expected, shard_shapes(shards), folder)
    model.load_state_dict(load_shards(shards, dtype, placement), strict=True, assign=True)
    model.reset_rotary()  # its inverse frequencies are a non-persistent buffer, still on meta
    return model.eval()


def check_vocabulary(config, text: Emu35TextTokenizer, folder: Path) -> None:
    """The tokenizer files and the model must agree on the visual id range [151854, 151854 + 131072)."""
    ids = text.ids
    if (ids.first_visual, ids.num_visual) != (Emu35Backbone.code_offset, Emu35Backbone.codebook_size):
        raise CheckpointError(
            f"the tokenizer files give visual ids from {ids.first_visual} for {ids.num_visual} codes, not Emu3.5's "
            f"{Emu35Backbone.code_offset} for {Emu35Backbone.codebook_size}; "
            f"use the published emu3.tiktoken and emu3_vision_tokens.txt"
        )
    if config.vocab_size < ids.first_visual + ids.num_visual:
        raise CheckpointError(f"{folder} has vocab_size {config.vocab_size}, too small for "
                              f"{ids.first_visual + ids.num_visual} token ids")


def load_vision(path: str | Path) -> IBQTokenizer:
    """The IBQ tokenizer from a folder (or a weights file beside its config), in float32."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if (folder / "config.json").is_file():
        cfg = ibq_config_from_json(load_json(folder / "config.json"), folder / "config.json")
        weights = path if path.is_file() else folder / "model.safetensors"
    elif (folder / "config.yaml").is_file():
        cfg = ibq_config_from_yaml(folder / "config.yaml")
        weights = path if path.is_file() else folder / "model.ckpt"
    else:
        raise CheckpointError(f"no config.json or config.yaml in {folder}; "
                              "pass the Emu3.5-VisionTokenizer folder as --vq-path")
    state = strip_prefixes(select_state_dict(load_weights(weights), weights, marker="quantize.embedding.weight"))
    with torch.device("meta"):
        model = IBQ(cfg)
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, weights)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return IBQTokenizer(model)


IBQ_FIELDS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "z_channels", "in_channels",
              "out_ch")


def ibq_config_from_json(raw: dict[str, Any], path: Path) -> IBQConfig:
    if raw.get("model_type") != "Emu3p5VisionVQ":
        raise CheckpointError(f"{path} is not an Emu3.5 vision-tokenizer config "
                              f"(model_type {raw.get('model_type')!r}, expected 'Emu3p5VisionVQ')")
    return _ibq_config(
        {k: raw[k] for k in IBQ_FIELDS + ("codebook_size", "embed_dim") if k in raw}, raw.get("double_z"), path)


def ibq_config_from_yaml(path: Path) -> IBQConfig:
    require("yaml", "emu35")
    import yaml

    raw = yaml.safe_load(path.read_text()) or {}
    dd = raw.get("ddconfig")
    if not isinstance(dd, dict) or "n_embed" not in raw or "embed_dim" not in raw:
        raise CheckpointError(f"{path} is not an IBQ config (needs ddconfig, n_embed and embed_dim at the top level)")
    values = {k: dd[k] for k in IBQ_FIELDS if k in dd}
    return _ibq_config(
        {**values, "codebook_size": raw["n_embed"], "embed_dim": raw["embed_dim"]}, dd.get("double_z"), path)


def _ibq_config(values: dict[str, Any], double_z: Any, path: Path) -> IBQConfig:
    if double_z:
        raise CheckpointError(f"{path} sets double_z, which IBQ does not use (quant_conv reads z_channels); "
                              "it is not an IBQ config")
    try:
        return IBQConfig(**values)
    except ValueError as exc:
        raise CheckpointError(f"invalid IBQ config {path}: {str(exc).splitlines()[0]}") from None
