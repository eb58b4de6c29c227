"""Emu3.5's text tokenizer and text-to-image prompt layout (reference/emu35_glm.md §3-§5).

The vocabulary is built from the files published beside the model:

* ``emu3.tiktoken``: 151,643 base64 BPE ranks (ids 0..151642), split with Qwen's pattern;
* then, from id 151,643 on: ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<|extra_0|>`` ...
  ``<|extra_204|>``, then the lines of ``emu3_vision_tokens.txt``: ``<|image token|>``,
  ``<|image start|>``, ``<|image end|>``, ``<|visual token 000000|>`` ... So the first visual token is
  151,854 and visual id = 151,854 + IBQ code.

Only the text specials and the three image-structure tokens are handed to tiktoken (compiling a matcher
for all 131,283 specials costs seconds); visual ids are pure arithmetic, checked against the file on load.

A text-to-image prefix is ``template(prompt) + BOI + "H*W" + IMG``: the size text counts token rows and
columns, one token per character. The unconditional prefix uses Emu3.5's "no_text" template.
"""

from __future__ import annotations

import base64
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from flashar.errors import CheckpointError, FlashARError, require

VOCAB_FILE = "emu3.tiktoken"
VISION_TOKENS_FILE = "emu3_vision_tokens.txt"
# Qwen's pre-tokenisation pattern, as used by the published Emu3Tokenizer.
SPLIT_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
FIRST_SPECIAL_ID = 151643
TEXT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(f"<|extra_{i}|>" for i in range(205))
IMAGE_STRUCTURE = ("<|image token|>", "<|image start|>", "<|image end|>")  # IMG, BOI, EOI

# Surface forms of the roles (the reference's ``build_emu3p5``); ids come from the files.
PAD, BOS, EOL, BSS = "<|endoftext|>", "<|extra_203|>", "<|extra_200|>", "<|extra_100|>"
IMG, BOI, EOI = IMAGE_STRUCTURE

# Emu3.5-Image text-to-image templates (configs/example_config_t2i.py, task "t2i", no reference image).
T2I_TEMPLATE = "<|extra_203|>You are a helpful assistant for t2i task. USER: {prompt} ASSISTANT: <|extra_100|>"
UNCOND_TEMPLATE = "<|extra_203|>You are a helpful assistant. USER:  ASSISTANT: <|extra_100|>"


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    bos: int
    eol: int
    img: int
    boi: int
    eoi: int
    first_visual: int  # the visual id of code 0
    num_visual: int  # the codebook size the vocabulary was built for


class Emu35TextTokenizer:
    """Prompts -> token ids of Emu3.5's vocabulary, with the t2i templates and the image prefix."""

    def __init__(self, folder: str | Path):
        require("tiktoken", "emu35")
        import tiktoken

        folder = Path(folder)
        ranks = read_ranks(folder / VOCAB_FILE)
        if len(ranks) != FIRST_SPECIAL_ID:
            raise CheckpointError(f"{folder / VOCAB_FILE} has {len(ranks)} BPE ranks, not {FIRST_SPECIAL_ID}; "
                                  "use the published emu3.tiktoken")
        num_visual = check_vision_tokens(folder / VISION_TOKENS_FILE)
        specials = {name: FIRST_SPECIAL_ID + i for i, name in enumerate(TEXT_SPECIALS + IMAGE_STRUCTURE)}
        self.encoding = tiktoken.Encoding("emu3", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
        self.ids = SpecialIds(
            pad=specials[PAD], bos=specials[BOS], eol=specials[EOL], img=specials[IMG], boi=specials[BOI],
            eoi=specials[EOI], first_visual=FIRST_SPECIAL_ID + len(specials), num_visual=num_visual,
        )

    def encode(self, text: str) -> list[int]:
        """Text -> ids. The surface forms of the text specials and of IMG/BOI/EOI become their ids, as in the
        reference tokenizer; visual-token forms stay plain text (prompts never carry them in t2i)."""
        return self.encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")

    def template(self, prompt: str | None, max_length: int | None = None) -> list[int]:
        """The conditional t2i template around ``prompt`` (None: the unconditional template).

        With ``max_length`` the prompt's own tokens are cut so the whole template fits; the template's
        head and tail (up to ``ASSISTANT: <|extra_100|>``) always stay intact.
        """
        if prompt is None:
            return self.encode(UNCOND_TEMPLATE)
        ids = self.encode(T2I_TEMPLATE.format(prompt=prompt))  # whole string: BPE merges across the joins
        if max_length is None or len(ids) <= max_length:
            return ids
        frame = len(self.encode(T2I_TEMPLATE.format(prompt="")))
        if frame >= max_length:
            raise FlashARError(f"text_max_length {max_length} leaves no room for the prompt; use at least {frame + 1}")
        words = self.encode(prompt)
        keep = max(0, len(words) - (len(ids) - max_length))
        while len(ids) > max_length:  # cut the prompt's own tokens until the re-encoded template fits
            ids = self.encode(T2I_TEMPLATE.format(prompt=self.decode(words[:keep])))
            keep -= 1
        return ids

    def image_prefix(self, height: int, width: int) -> list[int]:
        """BOI, the size text "H*W" (token rows * columns, one token per character), IMG (spec §4)."""
        return [self.ids.boi, *self.encoding.encode_ordinary(f"{height}*{width}"), self.ids.img]

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)


def read_ranks(path: Path) -> dict[bytes, int]:
    """``<base64 token> <rank>`` lines -> {token bytes: rank}."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise CheckpointError(f"Emu3.5 tokenizer file not found: {path}; pass a folder with {VOCAB_FILE} and "
                              f"{VISION_TOKENS_FILE} (--tokenizer-path)") from None
    ranks = {}
    for line in lines:
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def check_vision_tokens(path: Path) -> int:
    """Check the vision-token list (IMG, BOI, EOI, then ``<|visual token NNNNNN|>`` in order); return the count."""
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise CheckpointError(f"Emu3.5 tokenizer file not found: {path}; pass a folder with {VOCAB_FILE} and "
                              f"{VISION_TOKENS_FILE} (--tokenizer-path)") from None
    visual = names[len(IMAGE_STRUCTURE) :]
    if tuple(names[: len(IMAGE_STRUCTURE)]) != IMAGE_STRUCTURE or not visual:
        raise CheckpointError(f"{path} does not start with {', '.join(IMAGE_STRUCTURE)} followed by visual tokens")
    for code in (0, len(visual) - 1):
        if visual[code] != f"<|visual token {code:06d}|>":
            raise CheckpointError(f"{path} line {code + 4} is {visual[code]!r}, expected '<|visual token {code:06d}|>'")
    return len(visual)
