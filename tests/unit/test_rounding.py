"""GPTQ, AWQ and the block-wise driver, on small layers where the answer is checkable."""
import copy

import pytest
import torch

import qcompiler
import qcompiler.algorithms.rounding
import qcompiler.calibration.state
from conftest import rel_err
from models import Stack, with_outlier_channels
from qcompiler.algorithms import awq, clip_search, gptq
from qcompiler.calibration import blockwise
from qcompiler.ir import int4
from qcompiler.passes.sqnr import sqnr_db


def correlated_inputs(n, k, seed=0):
    """Calibration rows with correlated channels and a few large ones (what GPTQ/AWQ exploit)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(n, k, generator=g) @ mix
    x[:, :3] *= 20
    return x


def out_err(x, w, w_hat):
    return ((x @ (w_hat - w).t()).pow(2).sum() / (x @ w.t()).pow(2).sum()).item()


@pytest.mark.parametrize("k,group_size", [(64, 16), (96, 32), (100, 32), (576, 128)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_below_rtn(k, group_size, symmetric, act_order):
    torch.manual_seed(k)
    w = torch.randn(48, k) * 0.05
    x = correlated_inputs(4 * k, k)
    h = 2 * x.t() @ x / x.shape[0]
    p = gptq.gptq(w, h, group_size, symmetric, act_order=act_order)
    rtn = int4.quantize(w, group_size, symmetric)
    assert p.packed.shape == rtn.packed.shape and (p.zero is None) == symmetric
    e_gptq, e_rtn = out_err(x, w, p.dequantize()), out_err(x, w, rtn.dequantize())
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clipped", [False, True])
def test_gptq_with_identity_hessian_and_no_feedback_target_is_rtn(act_order, symmetric, clipped):
    # H = I: no column predicts another, so the error feedback has nothing to correct
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    clip = torch.rand(16, 2) * 0.5 + 0.5 if clipped else 1.0
    p = gptq.gptq(w, torch.eye(64), 32, symmetric, damp=1e-6, act_order=act_order, clip=clip)
    # the group scale is found from the same (unchanged) weights on the same clipped range: RTN's codes
    rtn = int4.quantize(w, 32, symmetric, clip)
    assert torch.equal(p.packed, rtn.packed) and torch.equal(p.scale, rtn.scale)


def test_gptq_dead_input_channels_quantize_to_zero():
    x = correlated_inputs(256, 64)
    x[:, 7] = 0
    w = torch.randn(8, 64)
    p = gptq.gptq(w, 2 * x.t() @ x / 256, 32, True)
    assert torch.equal(p.dequantize()[:, 7], torch.zeros(8))


def test_awq_scales_of_one_reproduce_rtn_exactly():
    torch.manual_seed(0)
    w, x = torch.randn(32, 64), correlated_inputs(128, 64)
    for gs, sym in ((32, True), (16, False)):
        ones = torch.ones(64)
        h = x.t() @ x
        assert awq.output_error([w], h, ones, gs, sym) == awq.output_error([w], h, None, gs, sym)
        assert torch.equal(int4.quantize(w * ones, gs, sym).packed, int4.quantize(w, gs, sym).packed)


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_is_never_worse_than_rtn_and_helps_outlier_channels(symmetric):
    torch.manual_seed(1)
    ws = [torch.randn(40, 96) * 0.05, torch.randn(24, 96) * 0.05]
    x = correlated_inputs(512, 96)
    r = qcompiler.get_recipe("w4a16-awq").replace(group_size=32, symmetric=symmetric, awq_grid=10,
                                                   weight_clip_grid=10, refit_scales=False)
    packed, s, reason = qcompiler.algorithms.rounding.round_weights(ws, x.t() @ x, x.abs().mean(0), r)
    assert s.shape == (96,) and (s > 0).all()
    for w, p in zip(ws, packed):
        e_awq = out_err(x, w, p.dequantize() / s)
        e_rtn = out_err(x, w, int4.quantize(w, 32, symmetric).dequantize())
        assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)
    assert "AWQ exponent" in reason and s[:3].mean() > s[3:].mean()  # large channels get larger scales


def test_clip_search_keeps_ratio_one_when_nothing_is_gained():
    w = torch.tensor([[1.0, -1.0] * 8])  # two values: any clipping only adds error
    x = torch.randn(64, 16)
    ratio = clip_search.search(w, x.t() @ x, 16, True, 10)
    assert torch.equal(ratio, torch.ones(1, 1))


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_objectives_equal_the_output_error_on_the_rows(symmetric):
    """The Gram-matrix objectives are the squared output errors on the rows behind them: the
    scale search's relative error, and per (row, group) the clip search's pick is the grid ratio
    whose group error on the rows is smallest."""
    torch.manual_seed(3)
    w, x = torch.randn(6, 48) * 0.1, correlated_inputs(200, 48).double()
    h = x.t() @ x
    s = torch.rand(48) + 0.5
    deq = int4.fake_quantize(w * s, 16, symmetric) / s
    rows = ((x @ (deq - w).t().double()).pow(2).sum() / (x @ w.t().double()).pow(2).sum()).item()
    assert abs(awq.output_error([w], h.float(), s, 16, symmetric) - rows) < 1e-4 * rows
    grid = 8
    ratio = clip_search.search(w, h.float(), 16, symmetric, grid)
    ratios = clip_search.ratios(grid)
    for n in range(6):
        for g in range(3):
            cols = slice(16 * g, 16 * g + 16)
            errs = [(x[:, cols] @ (int4.fake_quantize(w[n:n + 1, cols], 16, symmetric, r) - w[n:n + 1, cols])
                     .t().double()).pow(2).sum().item() for r in ratios]
            assert errs[ratios.index(float(ratio[n, g]))] <= min(errs) * (1 + 1e-4) + 1e-12


def test_find_blocks_prefers_the_layer_list():
    assert [n for n, _ in blockwise.find_blocks(Stack(n=3))] == ["blocks.0", "blocks.1", "blocks.2"]
    lin = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert blockwise.find_blocks(lin) == [("", lin)]


def test_blockwise_groups_linears_by_shared_input_and_sees_quantized_predecessors():
    torch.manual_seed(0)
    model = Stack(n=2, d=32, h=48)
    batches = [with_outlier_channels(torch.randn(2, 8, 32)) for _ in range(3)]
    seen = {}

    def handle(name, linears):
        seen[name] = {li.name: li for li in linears}
        # blocks.0 "quantized" to zero weights: its output is its input plus the two residual
        # branches' biases, which is what blocks.1 must see; with the FP weights it would not
        return {li.module: torch.zeros_like(li.module.weight) for li in linears}

    blockwise.run(model, batches, handle, need_hessian=True, max_rows=64, progress=False)
    b0, b1 = seen["blocks.0"], seen["blocks.1"]
    assert b0["blocks.0.q"].group == b0["blocks.0.k"].group == b0["blocks.0.v"].group
    assert b0["blocks.0.gate"].group == b0["blocks.0.up"].group != b0["blocks.0.q"].group
    assert b0["blocks.0.o"].group != b0["blocks.0.down"].group
    # tokens are counted once per input tensor, not once per reader
    assert b0["blocks.0.q"].inputs.tokens == 3 * 16
    b = model.blocks[0]
    x = torch.cat([b.reshape(-1, 32) for b in batches]) + b.o.bias + b.down.bias
    h1 = 2 * model.blocks[1].norm1(x).t() @ model.blocks[1].norm1(x) / x.shape[0]
    assert rel_err(b1["blocks.1.q"].inputs.hessian, h1) < 1e-5


def test_calibrate_with_gptq_leaves_the_model_untouched_and_beats_rtn():
    torch.manual_seed(0)
    model = Stack(n=2, d=64, h=96)
    before = copy.deepcopy(model.state_dict())
    batches = [with_outlier_channels(torch.randn(4, 16, 64)) for _ in range(4)]
    x = with_outlier_channels(torch.randn(4, 16, 64))
    ref = model(x)
    results = {}
    for recipe in ("w4a16", "w4a16-gptq", "w4a16-awq"):
        opts = {"recipe": recipe, "group_size": 32}
        qcompiler.calibrate(model, batches, recipe=opts, progress=False)
        torch._dynamo.reset()
        results[recipe] = sqnr_db(ref, torch.compile(model, backend="qcompile", options=opts)(x))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert results["w4a16-gptq"] > results["w4a16"] + 1 and results["w4a16-awq"] > results["w4a16"] + 1, results
    report = qcompiler.explain(model)
    awq_rows = [r for r in report if r.scheme == "w4a16-awq"]
    assert any(r.smoothing and "folded into" in r.smoothing for r in awq_rows)  # AWQ's s in the norms


def test_algorithm_recipe_without_prepared_weights_says_what_to_do():
    model = Stack()
    qcompiler.calibration.state.forget(model)
    with pytest.raises(Exception, match=r"no prepared weight.*calibrate\(model, batches, recipe='w4a16-gptq'\)"):
        torch.compile(model, backend="qcompile", options={"recipe": "w4a16-gptq"})(torch.randn(2, 4, 48))


def test_prepared_weights_for_other_settings_are_not_reused():
    model = Stack()
    qcompiler.calibrate(model, [torch.randn(2, 4, 48)], recipe={"recipe": "w4a16-gptq", "group_size": 16},
                        progress=False)
    with pytest.raises(Exception, match="different INT4 setting"):
        torch.compile(model, backend="qcompile", options={"recipe": "w4a16-gptq", "group_size": 32})(
            torch.randn(2, 4, 48))


def test_algorithm_recipes_need_data_passed_to_calibrate():
    with pytest.raises(qcompiler.CalibrationError, match="pass the batches"):
        qcompiler.calibrate(Stack(), recipe="w4a16-awq")


def test_auto_keeps_a_tied_output_projection_in_floating_point_and_says_why():
    torch.manual_seed(0)

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.body = torch.nn.Embedding(24, 48), Stack(n=2, d=48, h=64, head=24)
            self.body.lm_head.weight = self.emb.weight

        def forward(self, ids):
            return self.body(self.emb(ids))

    model, batches = LM(), [torch.randint(0, 24, (2, 12)) for _ in range(4)]
    qcompiler.calibrate(model, batches, recipe={"recipe": "auto", "budget": 0.05}, progress=False)
    torch.compile(model, backend="qcompile", options={"recipe": "auto"})(batches[0])
    head = qcompiler.explain(model).by_module("body.lm_head")
    assert head.scheme == "floating point" and "tied" in head.reason
    run = qcompiler.calibration.state.state_of(model).last_run
    assert run["algorithm"] == "auto" and run["ppl_ratio"] <= 1.05
    # explain states the search's own estimate and its uncertainty
    assert not run["ppl_increase_se"] < 0 and "auto: estimated perplexity increase" in str(qcompiler.explain(model))
    assert f"{100 * run['ppl_increase']:+.2f}%" in str(qcompiler.explain(model))


def test_auto_search_spends_the_budget_on_size_before_speed():
    """Formats 0 = INT4, 1 = w8a8, 2 = w8a16 (faster first); the loss adds the chosen errors."""
    from qcompiler.algorithms.auto import search

    errors = {"a": {0: (4, 1e-2), 1: (8, 1e-4), 2: (8, 1e-5)},
              "b": {0: (4, 5e-2), 1: (8, 2e-3), 2: (8, 1e-5)},
              "c": {0: (4, 1e-3), 1: (8, 1e-2), 2: (8, 1e-6)}}   # c: activations hard, weights easy
    loss = lambda a: sum(errors[k][i][1] for k, i in a.items() if i is not None)  # noqa: E731
    best, best_loss, evals = search(errors, loss, lambda l: l <= 0.012)
    # a single threshold over all formats gets only c to INT4 (a and b to w8a8, 3.1e-3); here a
    # and c are INT4, b stays w8a16 because its w8a8 would overrun the budget
    assert best == {"a": 0, "b": 2, "c": 0} and best_loss == pytest.approx(1.1e-2 + 1e-5)
    assert evals <= 2 * 4   # two binary searches over at most 9 thresholds each
    # a larger budget buys speed once every size is settled
    best, _, _ = search(errors, loss, lambda l: l <= 0.0135)
    assert best == {"a": 0, "b": 1, "c": 0}
    # nothing fits: all floating point, no loss measured within the budget
    assert search(errors, loss, lambda l: l <= 0)[:2] == ({"a": None, "b": None, "c": None}, None)


@pytest.mark.parametrize("weight", [1.0, 64.0])
def test_hessian_weights_each_sequences_first_token(weight):
    from qcompiler.calibration.blockwise import InputStats

    x = torch.randn(3, 7, 16)
    stats = InputStats(16, True, 8, "l", first_token_weight=weight)
    stats.update(x)
    flat, first = x.reshape(-1, 16).double(), x[:, 0].double()
    expected = flat.t() @ flat + (weight - 1) * first.t() @ first
    torch.testing.assert_close(stats.xtx, expected, rtol=1e-5, atol=1e-4)
    assert stats.tokens == 21 and torch.allclose(stats.mean_abs, x.abs().reshape(-1, 16).mean(0))


def test_first_token_weight_below_one_is_refused():
    with pytest.raises(ValueError, match="first_token_weight must be >= 1"):
        qcompiler.get_recipe("w4a16-gptq").replace(first_token_weight=0.5)


@pytest.mark.parametrize("algorithm", ["awq", "gptq", "awq-gptq"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_every_algorithm_rounds_on_the_searched_clip_grid(algorithm, symmetric):
    # a diagonal Hessian: no channel predicts another, so GPTQ's feedback has nothing to correct
    # and every algorithm is round-to-nearest of W s (s = 1 without AWQ) on the clip search's ratios
    torch.manual_seed(4)
    w = torch.randn(24, 64)
    w[:, 5] *= 6   # outliers make clipping worth it for some groups
    h = torch.diag(torch.rand(64) + 0.5)
    r = qcompiler.get_recipe(f"w4a16-{algorithm}").replace(group_size=32, symmetric=symmetric, refit_scales=False,
                                                          gptq_damp=1e-6, weight_clip_grid=10)
    (p,), s, _ = qcompiler.algorithms.rounding.round_weights([w], h, torch.rand(64) + 0.5, r)
    s = torch.ones(64) if s is None else s
    ratio = clip_search.search(w * s, h / s[:, None] / s[None, :], 32, symmetric, 10)
    assert (ratio < 1).any()
    expected = int4.quantize(w * s, 32, symmetric, ratio)
    assert torch.equal(p.packed, expected.packed) and torch.allclose(p.scale, expected.scale, rtol=1e-6)
    (p_off,), s_off, _ = qcompiler.algorithms.rounding.round_weights([w], h, torch.rand(64) + 0.5,
                                                                 r.replace(weight_clip=False))
    assert torch.equal(p_off.packed, int4.quantize(w if s_off is None else w * s_off, 32, symmetric).packed)


@pytest.mark.parametrize("algorithm", ["awq", "gptq", "awq-gptq"])
def test_scale_refit_never_raises_the_calibration_error_of_any_algorithm(algorithm):
    torch.manual_seed(5)
    ws = [torch.randn(32, 96) * 0.05, torch.randn(16, 96) * 0.05]
    x = correlated_inputs(384, 96)
    r = qcompiler.get_recipe(f"w4a16-{algorithm}").replace(group_size=32, awq_grid=8, weight_clip_grid=8)
    errs = {}
    for refit in (False, True):
        packed, s, _ = qcompiler.algorithms.rounding.round_weights(ws, x.t() @ x, x.abs().mean(0),
                                                               r.replace(refit_scales=refit))
        errs[refit] = [out_err(x, w, p.dequantize() if s is None else p.dequantize() / s)
                       for w, p in zip(ws, packed)]
    assert all(on <= off * (1 + 1e-5) for on, off in zip(errs[True], errs[False])), errs
    assert sum(errs[True]) < sum(errs[False]), errs
