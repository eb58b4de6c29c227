"""Shared pieces of the method tests: tiny backbones, the exact raster distribution, a chi-square bound."""

from __future__ import annotations

import math
from collections import Counter

import torch
from helpers import random_gpt

from flashar import geometry
from flashar.compilation import CompileCounter
from flashar.config import SamplingConfig
from flashar.decoding import guided
from flashar.sampling import make_generator, processed_probs


def row_end_backbone(seed: int = 2):
    """A tiny LlamaGen whose native layout ends every row but the last with a forced token (like Emu3.5's EOL)."""
    backbone = random_gpt(seed, vocab_size=65)
    backbone.codebook_size, backbone.row_end_token = 64, 64
    return backbone


def weakly_contextual(backbone, mix: float = 0.1):
    """Pull every token embedding towards one shared vector, so predictions depend only weakly on earlier
    tokens and Jacobi drafts are often, but not always, accepted (both verification branches run)."""
    with torch.no_grad():
        table = backbone.tok_embeddings.weight
        table.copy_(table[:1] + mix * (table - table[:1]))
    return backbone


def exact_joint(backbone, condition, grid, sampling, depth: int) -> dict[tuple[int, ...], float]:
    """P(first ``depth`` raster codes) under raster decoding, by enumerating the processed distributions
    (CFG, temperature, top-k) with a full no-cache forward for every prefix of codes."""
    height, width = grid
    prefix = backbone.prefix([condition], cfg=sampling.use_cfg, grid=grid)
    joint = {(): 1.0}
    with torch.no_grad():
        for j in range(depth):
            grown = {}
            for codes, mass in joint.items():
                ids = backbone.code_ids(torch.tensor([codes], dtype=torch.long))
                ids = torch.cat([ids, ids]) if sampling.use_cfg else ids
                x = torch.cat([prefix.embeds, backbone.embed(ids)], dim=1)
                cells = geometry.raster_cells(height, width)[:j]
                positions = torch.cat([prefix.positions, backbone.cell_positions(cells, prefix.length, grid=grid)])
                h, _ = backbone(x, positions, geometry.sequence_mask(prefix.valid, geometry.causal_mask(j)))
                p = processed_probs(guided(backbone.logits(h[:, -1]), sampling), sampling)[0]
                for code in torch.nonzero(p).flatten().tolist():
                    grown[codes + (code,)] = mass * p[code].item()
            joint = grown
    return joint


def sample_codes(
    method, condition, grid, sampling, batch: int, calls: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    """``batch * calls`` independent grids (N, H, W) from one seeded generator, and the mean forward passes."""
    generator = make_generator(seed, "cpu")
    results = [method.generate([condition] * batch, grid, sampling, generator) for _ in range(calls)]
    return torch.cat([r.codes for r in results]), sum(r.num_forward_passes for r in results) / calls

def chi_square(samples: torch.Tensor, expected: dict[tuple[int, ...], float], depth: int) -> tuple[float, int, int]:
    """Pearson statistic of the first ``depth`` codes of each sample against ``expected``.

    Outcomes expected fewer than 5 times share one bin. Returns (statistic, degrees of freedom, number of
    samples outside the support of ``expected``).
    """
    counts = Counter(tuple(row[:depth].tolist()) for row in samples.flatten(1))
    total = len(samples)
    outside = sum(n for outcome, n in counts.items() if outcome not in expected)
    bins = [(counts.get(o, 0), total * p) for o, p in expected.items() if total * p >= 5]
    rare = [(counts.get(o, 0), total * p) for o, p in expected.items() if total * p < 5]
    if rare:
        bins.append((sum(n for n, _ in rare) + outside, sum(e for _, e in rare)))
    return sum((n - e) ** 2 / e for n, e in bins), len(bins) - 1, outside


def chi_square_bound(df: int, z: float = 3.719) -> float:
    """Upper 1e-4 quantile of chi-square(df) (Wilson-Hilferty; z is the normal 1e-4 quantile)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def compile_and_compare(cls, options, sampling: SamplingConfig):
    """Generate with the step compiled (``fullgraph``, counting backend, recompiles are errors) and eagerly,
    from the same seed. Returns (compiled result, eager result, number of compiled frames)."""
    backbone = random_gpt()
    torch._dynamo.reset()
    counter = CompileCounter()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = cls(backbone, options, compile=True, compile_backend=counter).generate(
            [3, 7], (4, 5), sampling, make_generator(3, "cpu"))
    eager = cls(backbone, options).generate([3, 7], (4, 5), sampling, make_generator(3, "cpu"))
    return compiled, eager, counter.frames
