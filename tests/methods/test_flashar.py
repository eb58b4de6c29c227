"""FlashAR decoding: exact parity with the teacher-forced forward, pass counts, gates, compiling."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_gpt

from flashar import geometry
from flashar.adapter import Adapter, new_metadata
from flashar.branch import INTERIOR, FlashARHead
from flashar.compilation import CompileCounter
from flashar.config import BranchConfig, SamplingConfig
from flashar.errors import FlashARError
from flashar.methods.flashar import FlashAR
from flashar.sampling import make_generator
from flashar.teacher import flashar_logits, grid_inputs


def make_method(gate="hidden", grid=(3, 4), num_blocks=1, randomise=True, row_lag=1, **kwargs):
    backbone = random_gpt()
    head = FlashARHead(backbone, BranchConfig(gate=gate, num_blocks=num_blocks, row_lag=row_lag))
    if randomise:  # trained gates are not 0.5; make them position dependent
        with torch.no_grad():
            for name, p in head.named_parameters():
                if "gate" in name or "mix" in name:
                    p.normal_(0, 0.3)
    adapter = Adapter(new_metadata(backbone, head, grid), head, backbone)
    return FlashAR(backbone, adapter=adapter, **kwargs)


@pytest.mark.parametrize("gate", ["hidden", "logits", "scalar", "fixed"])
@pytest.mark.parametrize("grid", [(3, 4), (4, 2), (1, 3)])
def test_cached_decoder_logits_equal_teacher_forced_logits(gate, grid):
    method = make_method(gate, grid)
    codes = torch.randint(0, 64, (2, *grid), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cached = method.teacher_logits([1, 2], codes, SamplingConfig(cfg_scale=2.0))
        teacher = flashar_logits(method.backbone, method.head, method.backbone.prefix([1, 2], cfg=True), codes).fused
    torch.testing.assert_close(cached, teacher, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("row_lag", [2, 3])
@pytest.mark.parametrize("buckets", [1, None])
def test_a_row_lag_decodes_k_r_plus_c_diagonals_with_the_teacher_forced_logits(row_lag, buckets):
    """With a row lag k the cached decoder computes the teacher-forced logits under the k*r+c mask, in
    k*(H-1)+W passes, and its greedy draws are their argmax."""
    from flashar.methods.flashar import FlashAROptions

    grid = (4, 5)
    method = make_method(grid=grid, row_lag=row_lag)
    method.options = FlashAROptions(buckets=buckets)
    codes = torch.randint(0, 64, (2, *grid), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cached = method.teacher_logits([1, 2], codes, SamplingConfig(cfg_scale=2.0))
        teacher = flashar_logits(method.backbone, method.head, method.backbone.prefix([1, 2], cfg=True), codes).fused
        lag1 = flashar_logits(
            method.backbone, make_method(grid=grid).head, method.backbone.prefix([1, 2], cfg=True), codes).fused
    torch.testing.assert_close(cached, teacher, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(teacher, lag1, atol=1e-3)  # the mask differs from the anti-diagonal one
    calls = []
    method.backbone.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[1]))
    result = method.generate([0, 9], grid, SamplingConfig(cfg_scale=2.5, top_k=1), make_generator(0, "cpu"))
    assert result.num_forward_passes == len(calls) == FlashAR.num_forward_passes(*grid, row_lag) == row_lag * 3 + 5
    assert method.passes(grid) == result.num_forward_passes  # the instance's own count (progress bars read it)
    with torch.no_grad():
        fused = flashar_logits(
            method.backbone, method.head, method.backbone.prefix([0, 9], cfg=True), result.codes).fused
    cond, uncond = fused.chunk(2)
    assert torch.equal((uncond + 2.5 * (cond - uncond)).argmax(-1).view(2, *grid), result.codes)


def test_an_adapter_refuses_a_grid_narrower_than_its_row_lag():
    method = make_method(grid=(3, 2), row_lag=3)
    with pytest.raises(FlashARError, match="row lag 3 exceeds the grid's width 2"):
        method.generate([1], (3, 2), SamplingConfig(), make_generator(0, "cpu"))


@pytest.mark.parametrize("buckets", [1, None])
def test_generation_uses_h_plus_w_minus_1_passes_and_samples_each_cell_once(buckets):
    from flashar.methods.flashar import FlashAROptions

    grid = (3, 5)
    method = make_method(grid=grid)
    method.options = FlashAROptions(buckets=buckets)
    calls, written = [], []
    method.backbone.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[1]))
    store = method._store
    method._store = lambda st, cells, logits: (written.append(cells.clone()), store(st, cells, logits))
    result = method.generate([1, 2, 3], grid, SamplingConfig(cfg_scale=1.5), make_generator(0, "cpu"))
    assert result.num_forward_passes == len(calls) == grid[0] + grid[1] - 1
    if buckets == 1:
        assert calls[1:] == [min(grid)] * (len(calls) - 1)  # every step feeds one padded diagonal
    else:  # eager default: step t feeds diagonal t-1 and predicts diagonal t, no padding beyond the longer one
        assert calls[1:] == [2, 3, 3, 3, 3, 2]
    cells = torch.cat(written)
    cells = cells[cells < grid[0] * grid[1]]
    assert sorted(cells.tolist()) == list(range(grid[0] * grid[1]))
    assert result.codes.shape == (3, *grid)


def test_gate_is_one_half_at_initialisation():
    method = make_method(randomise=False)
    codes = torch.randint(0, 64, (2, 3, 4))
    out = flashar_logits(method.backbone, method.head, method.backbone.prefix([1, 2], cfg=False), codes)
    torch.testing.assert_close(
        out.gate[:, out.kind == INTERIOR], torch.full_like(out.gate[:, out.kind == INTERIOR], 0.5))
    assert out.gate[:, 0].allclose(torch.tensor(0.5))  # the corner gate too


def test_gate_fixed_at_one_gives_the_horizontal_logits():
    method = make_method(randomise=False)
    with torch.no_grad():
        method.head.hv_gate_mlp[2].bias.fill_(100.0)
        method.head.hv_gate_corner.bias.fill_(100.0)
    codes = torch.randint(0, 64, (1, 3, 4))
    backbone = method.backbone
    with torch.no_grad():
        out = flashar_logits(backbone, method.head, backbone.prefix([5], cfg=False), codes)
        x, positions, _ = grid_inputs(backbone, backbone.prefix([5], cfg=False), codes)  # the backbone alone
        mask = geometry.sequence_mask(torch.ones(1, 1, dtype=torch.bool), geometry.proximity_mask(3, 4))
        h, _ = backbone(x, positions, mask)
    horizontal = backbone.logits(h[:, :-1])  # state at position p predicts the next raster cell
    cols = torch.arange(12) % 4
    torch.testing.assert_close(out.fused[0, cols > 0], horizontal[0, cols > 0], atol=1e-4, rtol=1e-4)


def test_greedy_decoding_is_argmax_of_the_teacher_forced_logits():
    grid = (4, 3)
    method = make_method(grid=grid)
    sampling = SamplingConfig(cfg_scale=2.5, top_k=1)
    result = method.generate([0, 9], grid, sampling, make_generator(0, "cpu"))
    with torch.no_grad():
        fused = flashar_logits(
            method.backbone, method.head, method.backbone.prefix([0, 9], cfg=True), result.codes).fused
    cond, uncond = fused.chunk(2)
    assert torch.equal((uncond + 2.5 * (cond - uncond)).argmax(-1).view(2, *grid), result.codes)


def test_step_compiles_once_per_generation_without_graph_breaks():
    torch._dynamo.reset()
    counter = CompileCounter()
    grid = (3, 4)
    compiled = make_method(grid=grid, compile=True, compile_backend=counter)
    sampling = SamplingConfig(cfg_scale=2.0, top_k=6, top_p=0.9)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = compiled.generate([1, 2], grid, sampling, make_generator(5, "cpu"))
        again = compiled.generate([3, 4], grid, sampling, make_generator(6, "cpu"))
    eager = make_method(grid=grid).generate([1, 2], grid, sampling, make_generator(5, "cpu"))
    assert counter.frames == 1
    # on CPU the one graph takes every diagonal at its own length (sizes 2 and 3 here), nothing padded
    assert compiled.setup([1], grid, sampling).plan.widths == [2, 3, 3, 3, 2]
    assert torch.equal(got.codes, eager.codes) and again.codes.shape == got.codes.shape


def test_steps_attend_to_the_diagonals_appended_so_far():
    """Cells are cached diagonal by diagonal, so a step's keys are the prefix plus the cells of diagonals
    <= the one it appends (2 at least), and the branch's the same without the prefix."""
    method = make_method(grid=(3, 4))
    spans = {"backbone": [], "branch": []}
    layer_forward = method.backbone.layer_forward

    def record(layer, x, positions, mask, kv, slots):
        spans["branch" if layer is method.head.vertical_block[0] else "backbone"].append(mask.shape[-1])
        return layer_forward(layer, x, positions, mask, kv, slots)

    method.backbone.layer_forward = record
    method.generate([1], (3, 4), SamplingConfig(cfg_scale=2.0), make_generator(0, "cpu"))
    layers = method.backbone.num_layers
    seen = [2, 3, 6, 9, 11]  # cells of diagonals <= t - 1 for t = 1..5 (diagonal sizes 1, 2, 3, 3, 2, 1), 2 at least
    assert spans["backbone"][::layers] == [1] + [1 + n for n in seen]  # the prefill reads the prefix only
    assert spans["branch"] == seen


@pytest.mark.slow
@pytest.mark.parametrize("mode", [True, "max-autotune"])
def test_step_compiles_with_inductor(mode):
    torch._dynamo.reset()
    grid = (4, 5)  # diagonal lengths 2..4 through one dynamic-length graph
    sampling = SamplingConfig(cfg_scale=2.0, top_k=1)
    got = make_method(grid=grid, compile=mode).generate([1, 2], grid, sampling, make_generator(0, "cpu"))
    eager = make_method(grid=grid).generate([1, 2], grid, sampling, make_generator(0, "cpu"))
    assert torch.equal(got.codes, eager.codes)


def test_adapter_for_another_grid_is_refused():
    method = make_method(grid=(3, 4))
    with pytest.raises(Exception, match="trained for a 3x4 token grid"):
        method.generate([1], (4, 4), SamplingConfig(), make_generator(0, "cpu"))


def test_bucketed_diagonals_decode_the_same_tokens_with_one_graph_per_size():
    from flashar.methods.flashar import FlashAROptions

    grid = (5, 6)
    sampling = SamplingConfig(cfg_scale=2.0, top_k=8)
    single = make_method(grid=grid).generate([1, 2], grid, sampling, make_generator(4, "cpu"))
    torch._dynamo.reset()
    counter = CompileCounter()
    method = make_method(grid=grid, compile=True, compile_backend=counter)
    method.options = FlashAROptions(buckets=3)
    bucketed = method.generate([1, 2], grid, sampling, make_generator(4, "cpu"))
    method.generate([3, 4], grid, sampling, make_generator(5, "cpu"))
    assert torch.equal(single.codes, bucketed.codes)
    assert counter.frames == 3 and bucketed.num_forward_passes == 10


def test_bucket_sizes_cover_every_step():
    from flashar import geometry
    from flashar.shapes import Shapes

    index, valid = geometry.diagonal_slots(8, 8)
    lengths = valid.sum(1).tolist()
    need = [max(lengths[t - 1], lengths[t]) for t in range(1, len(lengths))]
    steps = torch.arange(len(lengths))[1:]
    plan = Shapes().plan(steps, torch.arange(100), [50] * len(need), table=index, widths=need, buckets=4)
    assert sorted(set(plan.widths)) == [2, 4, 6, 8]
    for t, (width, (_, table, _)) in enumerate(zip(plan.widths, plan.args), start=1):
        assert width >= lengths[t] and width >= lengths[t - 1] and table.shape[1] == width
        assert torch.equal(table[t][: lengths[t]], index[t][: lengths[t]])



def test_coupled_draws_follow_the_diagonal():
    """With ``diagonal_coupling`` rho, the uniforms that draw neighbouring cells of one diagonal, (r, c) and
    (r + 1, c - 1), are Phi of an AR(1) with lag-1 correlation rho, each still U[0, 1); cells of different
    diagonals stay independent. ``diagonal_coupling=0`` keeps the independent draws."""
    from flashar.methods.flashar import FlashAROptions

    grid, rho = (6, 7), 0.6
    method = make_method(grid=grid)
    method.options = FlashAROptions(diagonal_coupling=rho)
    method.coupling = rho
    pairs, draws = [], []
    store = method._store

    def recording_store(st, cells, logits):
        u = st.uniform[: cells.shape[0], 0].clone()
        valid = cells < grid[0] * grid[1]
        draws.append(u[valid])
        for k in range(len(cells) - 1):
            if valid[k] and valid[k + 1]:
                (r1, c1), (r2, c2) = divmod(cells[k].item(), grid[1]), divmod(cells[k + 1].item(), grid[1])
                assert (r2, c2) == (r1 + 1, c1 - 1)  # consecutive slots are diagonal neighbours
                pairs.append(u[k : k + 2])
        return store(st, cells, logits)

    method._store = recording_store
    generator = make_generator(0, "cpu")
    for _ in range(300):
        method.generate([1], grid, SamplingConfig(), generator)
    z = math.sqrt(2) * torch.erfinv(2 * torch.stack(pairs).double() - 1)
    assert torch.corrcoef(z.T)[0, 1].item() == pytest.approx(rho, abs=0.05)
    counts = torch.histc(torch.cat(draws), bins=5, min=0, max=1)
    assert (counts / counts.sum() - 0.2).abs().max() < 0.02


def test_the_adapters_fitted_coupling_is_the_default_and_the_option_overrides_it():
    from flashar import api
    from flashar.backends.digits import WEIGHTS_DIR
    from flashar.methods.flashar import FlashAROptions

    backbone = api.load_backbone("digits", {})
    shipped = FlashAR(backbone)
    assert shipped.coupling == shipped.adapter.metadata.diagonal_coupling > 0  # fitted on the digits' held-out grids
    # in the paper's anti-diagonal order neighbouring gray levels on a diagonal are strongly coupled; the
    # default's row lag 2 lets each cell see the cell above-right, which leaves little (0.05)
    lag1 = FlashAR(backbone, FlashAROptions(adapter=WEIGHTS_DIR / "flashar-lag1"))
    assert lag1.coupling == lag1.adapter.metadata.diagonal_coupling > 0.3 > shipped.coupling
    assert FlashAR(backbone, FlashAROptions(diagonal_coupling=0.0)).coupling == 0.0
    state = shipped.setup([3], (16, 16), api.resolve_sampling(backbone, {}))
    assert (
        state.mixing is not None
        and FlashAR(backbone, FlashAROptions(diagonal_coupling=0.0)).setup([3], (16, 16), state.sampling).mixing is None
    )


def test_card_hidden_names_a_card_member_read_while_decoding():
    """The conformance suite's guard can fail: a method whose setup asks the card for the grid is caught."""
    from flashar.testing import card_hidden

    method = make_method(grid=(3, 4))
    build = method.build
    method.build = lambda prefix, batch, grid, sampling: (method.backbone.grid(), build(prefix, batch, grid, sampling))[
        1]
    with card_hidden(method.backbone), pytest.raises(AssertionError, match="card's 'grid'"):
        method.generate([1], (3, 4), SamplingConfig(), make_generator(0, "cpu"))
    assert method.backbone.grid(32) == (2, 2)  # and the card is back afterwards
