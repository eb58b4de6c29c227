"""Speculative Jacobi decoding (SJD): Teng et al., ICLR 2025, arXiv 2410.01699 (peer_methods.md §4.1-4.2).

Training-free and lossless. After the prefix, a window of L draft tokens follows the committed raster
prefix. Each forward pass feeds ``[last committed token, L drafts]`` under the causal mask, which gives the
processed distribution p (after CFG, temperature, top-k/top-p) at every window position. Drafts are
verified left to right with the speculative-sampling test: accept x with probability min(1, p(x)/q(x)),
where q is the distribution x was drawn from. At the first rejection a token is drawn from the residual
max(0, p - q). The unverified tail gets a Jacobi update: a fresh draw from its new p, or with
``coupling=maximal`` (SCD / MC-SJD, arXiv 2510.24211) its old draft is kept with probability min(1, p/q).
New window slots start as the token to their left (``repeat_horizon``, the official LlamaGen default) or
as uniform codes. Under greedy sampling this is Jacobi decoding and gives raster's tokens exactly.

Forward passes: data-dependent, between 1 + ceil((M - 1) / (L + 1)) and M for the M entries of the native
sequence (H*W cells, plus forced row ends); the prefill counts as one. A batch advances by the smallest
accepted count of its rows, as in the official code. The loop (``flashar.speculative``, shared with GSD)
reads back one scalar per iteration, the committed count, to decide when to stop.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from flashar import speculative
from flashar.hookspecs import hookimpl


class SJDOptions(speculative.SpeculativeOptions):
    """Speculative Jacobi decoding."""

    coupling: Literal["none", "maximal"] = Field(
        "none",
        description="Jacobi update of unverified drafts: a fresh draw (SJD) or the maximal coupling that keeps a "
                    "draft with probability min(1, p/q) (SCD, arXiv 2510.24211).",
    )


class SJD(speculative.SpeculativeMethod):
    id = "sjd"
    description = (
        "Speculative Jacobi decoding (lossless, training-free): verifies a window of draft tokens per forward pass.")
    Options = SJDOptions
    options: SJDOptions

    @property
    def coupled(self) -> bool:
        return self.options.coupling == "maximal"

    _rule = staticmethod(speculative.token_mass)


@hookimpl
def flashar_register_methods(register):
    register(SJD)
