"""Unit tests per pass on graphs as Dynamo hands them over: match, smooth, quantize."""
import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompiler
import qcompiler.calibration.state
from conftest import rel_err
from models import Block, Stack, capture, with_outlier_channels
from qcompiler.api.explain import findings
from qcompiler.passes.attention import quantize_attention
from qcompiler.passes import pipeline
from qcompiler.passes.graph_utils import qop_arguments
from qcompiler.passes.match import match
from qcompiler.passes.meta import FLOATING_POINT, META_KEY, Decision
from qcompiler.passes.sqnr import ErrorSums, sqnr_db, token_sqnr_db
from qcompiler.passes.smooth import choose, group_error, producing_linear, smooth, smooth_scale
from qcompiler.recipes import get_recipe

qops = torch.ops.qcompile


def qop_counts(gm):
    return Counter(n.target._opname for n in gm.graph.nodes
                   if n.op == "call_function" and getattr(n.target, "namespace", None) == "qcompile")


def run_passes(model, x, recipe):
    """The backend's passes on the captured graph: (graph, inputs, matches, plans, linear decisions)."""
    gm, ex = capture(model, x)
    done = pipeline.run_passes(gm, ex, recipe)
    return gm, ex, done.matches, done.plans, [d for d in done.decisions if d.op == "linear"]


def divided_inside(gm) -> list:
    """The static quantize ops that divide their input by a smoothing scale themselves."""
    return [n for n in gm.graph.nodes
            if n.target == qops.quantize_per_tensor.default and qop_arguments(n)["smooth_inv"] is not None]


class Forms(nn.Module):
    """Every way a linear op is written, plus two ops that are not linears."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.w_nk = nn.Parameter(torch.randn(16, 16) * 0.2)     # used as x @ w.t()
        self.w_kn = nn.Parameter(torch.randn(16, 16) * 0.2)     # used as x @ w
        self.w_mm = nn.Parameter(torch.randn(16, 16) * 0.2)     # addmm(b, x, w.t())
        self.b_mm = nn.Parameter(torch.randn(16) * 0.1)

    def forward(self, x):
        x = self.a(x)
        x = x @ self.w_nk.t()
        x = torch.matmul(x, self.w_kn)
        x = torch.addmm(self.b_mm, x, self.w_mm.t())
        scores = torch.softmax(x @ x.t(), -1)                    # activation x activation
        return F.scaled_dot_product_attention(x[None], x[None], x[None])[0] + scores @ x


def test_match_finds_every_linear_form_and_records_the_rest():
    torch.manual_seed(0)
    model, x = Forms(), torch.randn(8, 16)
    gm, ex = capture(model, x)
    found = match(gm, ex, get_recipe("w8a8"))
    assert sorted(m.pattern for _, m, _ in found) == ["addmm", "linear", "matmul", "matmul"]
    # nn.Linear: its module; a bare parameter of the root module: the parameter's name
    assert [m.module for _, m, _ in found] == ["a", "w_nk", "w_kn", "w_mm"]
    # the effective [N, K] weight is what F.linear would take, whatever the written form
    weights = {m.pattern + str(i): m.weight for i, (_, m, _) in enumerate(found)}
    assert any(w is not None and torch.equal(w, model.w_kn.t()) for w in weights.values())
    others = [n.meta[META_KEY] for n in gm.graph.nodes if isinstance(n.meta.get(META_KEY), Decision)]
    assert Counter(d.op for d in others) == {"matmul": 2}  # x @ x.t(), scores @ x (SDPA: the attention pass)
    assert all(d.scheme == FLOATING_POINT and d.reason for d in others)
    attention = quantize_attention(gm, ex, get_recipe("w8a8"))
    assert [d.op for d in attention] == ["attention"] and attention[0].scheme == FLOATING_POINT
    assert "attention=None" in attention[0].reason


@pytest.mark.parametrize("recipe,expected", [
    ("w8a8", {"quantize_per_token": 4, "linear_w8a8": 4}),
    ("w8a16", {"linear_w8a16": 4}),
])
def test_quantize_occurrences_and_numerics_for_every_form(recipe, expected):
    torch.manual_seed(0)
    model, x = Forms(), torch.randn(8, 16)
    gm, ex, *_ = run_passes(model, x, get_recipe(recipe))
    assert qop_counts(gm) == expected  # weights quantized at compile time: no quantize_per_channel
    consts = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr" and "wq" in n.target]
    assert len(consts) == 4 and all(c.dtype == torch.int8 for c in consts)
    out = gm(*ex)[0]
    assert rel_err(out, model(x)) < 0.02  # INT8 on a 5-layer chain: ~1% relative error


def test_skip_pattern_keeps_layer_in_floating_point():
    torch.manual_seed(0)
    model, x = Stack(n=1), torch.randn(2, 5, 48)
    gm, ex, *_ , decisions = run_passes(model, x, get_recipe("w8a8").replace(skip=["lm_head"]))
    d = {d.module: d for d in decisions}
    assert d["lm_head"].scheme == FLOATING_POINT and "skip" in d["lm_head"].reason
    assert qop_counts(gm)["linear_w8a8"] == 7


def calibrated(model, batches):
    with qcompiler.calibrate(model, batches, progress=False):
        pass


def calibrated_block(factor):
    """A Block calibrated on activations with outlier channels, and those activations."""
    torch.manual_seed(0)
    model = Block()
    x = with_outlier_channels(torch.randn(4, 16, 48), factor=factor)
    calibrated(model, [x])
    return model, x


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_smooth_folds_into_norm_when_the_group_is_its_only_consumer(norm):
    torch.manual_seed(0)
    model = Block(norm=norm)
    x = with_outlier_channels(torch.randn(4, 9, 48))
    calibrated(model, [x])
    params_before = copy.deepcopy(model.state_dict())
    gm, ex, matches, plans, _ = run_passes(model, x, get_recipe("w8a8-smoothquant"))
    folded = {m.module: plans[n].folded_into for n, m, _ in matches}
    # q/k/v share norm1, gate/up share norm2: folded; o and down read other activations
    assert folded["q"] == folded["k"] == folded["v"] == "norm1"
    assert folded["gate"] == folded["up"] == "norm2"
    assert folded["o"] is None and folded["down"] is None
    # so only o and down carry 1/s into their quantize op
    assert len(divided_inside(gm)) == 2
    # the user's model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, params_before[k]), k


def test_smooth_skip_leaves_a_group_unscaled_and_the_others_folded():
    torch.manual_seed(0)
    model = Block()
    x = with_outlier_channels(torch.randn(4, 9, 48))
    calibrated(model, [x])
    r = get_recipe("w8a8-smoothquant").replace(smooth_skip=["o", "dow*"])
    gm, ex, matches, plans, _ = run_passes(model, x, r)
    scaled = {m.module: plans[n].scale is not None for n, m, _ in matches}
    assert scaled == {"q": True, "k": True, "v": True, "gate": True, "up": True, "o": False, "down": False}
    assert {m.module: plans[n].folded_params for n, m, _ in matches}["q"] == ("norm1.weight",)
    assert not divided_inside(gm)  # nothing left to divide inside a quantize op


def test_the_linear_whose_rows_could_absorb_an_unfolded_scale():
    """A product of a linear's output with anything else: that linear (down's input is act(gate) * up)."""
    torch.manual_seed(0)
    model = Block()
    x = with_outlier_channels(torch.randn(2, 5, 48))
    calibrated(model, [x])
    gm, ex = capture(model, x)
    matches = match(gm, ex, get_recipe("w8a8-smoothquant"))
    module = {node: m.module for node, m, _ in matches}
    found = {}
    for node, m, _ in matches:
        group = {n for n, other, _ in matches if other.x is m.x}
        hit = producing_linear(m.x, group, set(module))
        found[m.module] = module.get(hit)
    assert found == {"q": None, "k": None, "v": None, "gate": None, "up": None, "o": "q", "down": "up"}


class TwoConsumers(nn.Module):
    """The norm output also feeds the residual, so 1/s must not be folded into it."""

    def __init__(self):
        super().__init__()
        self.norm, self.q, self.k = nn.LayerNorm(32), nn.Linear(32, 32), nn.Linear(32, 16)

    def forward(self, x):
        y = self.norm(x)
        return torch.cat([self.q(y), self.k(y)], -1) + torch.cat([y, y[..., :16]], -1)


class OneConsumer(TwoConsumers):
    def forward(self, x):
        y = self.norm(x)
        return torch.cat([self.q(y), self.k(y)], -1)


def test_folded_and_unfolded_smoothing_compute_the_same_layer():
    torch.manual_seed(0)
    a, b = OneConsumer(), TwoConsumers()
    b.load_state_dict(a.state_dict())
    x = with_outlier_channels(torch.randn(3, 7, 32))
    calibrated(a, [x])
    calibrated(b, [x])
    r = get_recipe("w8a8-smoothquant").replace(alpha=0.7)
    ga, exa, ma, pa, _ = run_passes(a, x, r)
    gb, exb, mb, pb, _ = run_passes(b, x, r)
    assert {p.folded_into for p in pa.values()} == {"norm"}
    assert {p.folded_into for p in pb.values()} == {None}
    ya = ga(*exa)[0]
    yb = gb(*exb)[0] - torch.cat([b.norm(x), b.norm(x)[..., :16]], -1)
    # the same s, weights and scales; only where 1/s is multiplied differs (float32 rounding)
    assert rel_err(ya, yb) < 1e-3


def test_smoothquant_recovers_accuracy_on_outlier_channels():
    model, x = calibrated_block(factor=60.0)
    ref = model(x)
    # no SQNR floor or static-scale guard: compare the two quantizations of every layer, not fallbacks to FP
    plain = run_passes(model, x, get_recipe("w8a8-static").replace(min_sqnr_db=None, max_static_loss_db=None))
    sq = run_passes(model, x, get_recipe("w8a8-smoothquant").replace(alpha="auto", min_sqnr_db=None,
                                                                      max_static_loss_db=None))
    s_plain, s_sq = sqnr_db(ref, plain[0](*plain[1])[0]), sqnr_db(ref, sq[0](*sq[1])[0])
    assert s_sq > s_plain + 6, (s_plain, s_sq)  # at least 4x less noise power


def test_smooth_scale_formula():
    act, w = torch.tensor([4.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0])
    s = smooth_scale(act, w, 0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.5]))
    assert s[2] > 0  # a dead channel still gets a finite, positive scale


def test_alpha_auto_is_the_argmin_of_the_group_error():
    """``alpha="auto"`` picks the grid alpha whose q/k/v outputs are closest to the float ones on
    the calibration rows: each alpha's error measured here, independently of the search's own
    measure (inputs hooked in float64, the smoothed static INT8 round trip written out)."""
    torch.manual_seed(0)
    model = Block()
    x = with_outlier_channels(torch.randn(4, 16, 48))
    seen = []
    hook = model.q.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().double()))
    calibrated(model, [x])
    hook.remove()
    rows = seen[0].reshape(-1, 48)
    recipe = get_recipe("w8a8-smoothquant").replace(alpha="auto")
    weights = [m.weight.detach().double() for m in (model.q, model.k, model.v)]

    def round_trip(t, dim):  # symmetric INT8, scale max|t| / 127 per slice along dim (None: whole)
        amax = t.abs().amax() if dim is None else t.abs().amax(dim, keepdim=True)
        scale = (amax.float().clamp_min(1e-12) / 127).double()
        return (t / scale).round().clamp(-128, 127) * scale

    def error(alpha):
        s = rows.abs().amax(0).pow(alpha) / torch.cat(weights).abs().amax(0).pow(1 - alpha)
        s = s.clamp_min(1e-5)
        x_hat = round_trip(rows / s, None)
        return sum(((x_hat @ round_trip(w * s, -1).t() - rows @ w.t()).pow(2).sum() / (rows @ w.t()).pow(2).sum()).item()
                   for w in weights)

    errors = {a: error(a) for a in recipe.alpha_grid}
    stats = qcompiler.calibration.state.stats_for(model.q.weight)
    alpha, _ = choose([m.weight.detach() for m in (model.q, model.k, model.v)], stats, recipe)
    best = min(errors, key=errors.get)
    assert errors[alpha] <= errors[best] * 1.001, (alpha, best, errors)  # the best, or a float32 tie
    assert max(errors.values()) > 1.5 * errors[best]  # the grid matters here: the pick is not a coin toss


def test_clip_search_never_loses_to_no_clipping():
    torch.manual_seed(0)
    model = Block()
    x = with_outlier_channels(torch.randn(4, 16, 48), factor=30.0)
    x[:, 0] *= 20  # a few tokens with massive activations, as at an LLM's first position
    calibrated(model, [x])
    recipe = get_recipe("w8a8-smoothquant").replace(alpha="auto", clip="auto")
    stats = qcompiler.calibration.state.stats_for(model.gate.weight)
    weights = [model.gate.weight.detach(), model.up.weight.detach()]
    alpha, clip = choose(weights, stats, recipe)
    assert clip in recipe.clip_grid and alpha in recipe.alpha_grid
    w_absmax = torch.cat(weights).abs().amax(0)
    s = smooth_scale(stats.channel_absmax, w_absmax, alpha)
    assert group_error(weights, stats, recipe, s, clip) <= group_error(weights, stats, recipe, s, 1.0)
    gm, ex, matches, plans, decisions = run_passes(model, x, recipe)
    assert {plans[n].clip for n, m, _ in matches if m.module in ("gate", "up")} == {clip}
    assert all(d.clip in recipe.clip_grid for d in decisions)


def test_clip_search_works_without_smoothquant():
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(4, 16, 48)
    calibrated(model, [x])
    # the static-scale guard off: every layer quantized (the down projection loses 6.7 dB to per-token scales)
    gm, ex, matches, plans, decisions = run_passes(model, x, get_recipe("w8a8-static").replace(
        clip="auto", max_static_loss_db=None))
    assert all(p.scale is None and p.alpha is None for p in plans.values())
    assert qop_counts(gm) == {"quantize_per_tensor": 7, "linear_w8a8": 7}


def test_smoothquant_without_calibration_is_a_clear_error():
    model = Block()
    gm, ex = capture(model, torch.randn(2, 3, 48))
    r = get_recipe("w8a8-smoothquant-dynamic")
    with pytest.raises(qcompiler.CalibrationError, match="calibrate"):
        smooth(gm, ex, match(gm, ex, r))


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_static_observers_give_usable_scales(observer):
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(4, 16, 48)
    calibrated(model, [x])
    gm, ex, *_ , decisions = run_passes(model, x, get_recipe("w8a8-static").replace(observer=observer,
                                                                                   max_static_loss_db=None))
    assert qop_counts(gm) == {"quantize_per_tensor": 7, "linear_w8a8": 7}
    assert all(d.sqnr_db > 25 for d in decisions), [(d.module, d.sqnr_db) for d in decisions]


class TiedLM(nn.Module):
    """An embedding and an output projection sharing one weight, as tied LMs do."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.embed(ids))))


@pytest.mark.parametrize("quantize_tied", [False, True])
def test_tied_output_projection_stays_float_unless_asked(quantize_tied):
    torch.manual_seed(0)
    model, ids = TiedLM(), torch.randint(0, 50, (2, 7))
    gm, ex, *_, decisions = run_passes(model, ids, get_recipe("w8a8").replace(quantize_tied=quantize_tied))
    d = {d.module: d for d in decisions}
    assert d["mid"].scheme == "w8a8"
    if quantize_tied:
        assert d["head"].scheme == "w8a8"
    else:
        assert d["head"].scheme == FLOATING_POINT and "tied" in d["head"].reason
    assert qop_counts(gm)["linear_w8a8"] == (2 if quantize_tied else 1)


def test_a_layer_below_the_sqnr_floor_stays_float_and_still_computes_correctly():
    model, x = calibrated_block(factor=30.0)
    ref = model(x)
    # a floor no INT8 layer can reach: every linear falls back, folded smoothing included
    gm, ex, matches, plans, decisions = run_passes(
        model, x, get_recipe("w8a8-smoothquant").replace(min_sqnr_db=200.0))
    assert all(d.scheme == FLOATING_POINT and "min_sqnr_db=200" in d.reason for d in decisions)
    assert any(p.folded_into for p in plans.values())  # the norms were smoothed ...
    assert rel_err(gm(*ex)[0], ref) < 1e-5             # ... and the FP layers absorbed s
    assert not qop_counts(gm)
    # a floor every layer clears changes nothing
    _, _, _, _, kept = run_passes(model, x, get_recipe("w8a8-smoothquant").replace(min_sqnr_db=1.0,
                                                                                   max_static_loss_db=None))
    assert all(d.scheme == "w8a8-smoothquant" for d in kept)


def with_massive_tokens(x, factor=300.0):
    """Every sequence's first token carries activations ``factor`` times the others' (a sentence
    encoder's special tokens): one per-tensor scale cannot serve both kinds of token."""
    x = x.clone()
    x[:, 0, :] *= factor
    return x


@pytest.mark.parametrize("recipe", ["w8a8-static", "w8a8-smoothquant"])
def test_a_static_scale_far_worse_than_per_token_keeps_the_activations_float(recipe):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 48)).eval()
    x = with_massive_tokens(torch.randn(4, 9, 48))
    calibrated(model, [x])
    ref = model(x)
    # the guard off: the layers are quantized, and their static scales lose far more than 6 dB
    _, _, _, _, off = run_passes(model, x, get_recipe(recipe).replace(max_static_loss_db=None))
    losses = {d.module: d.static_loss_db for d in off}
    assert all(d.scheme == recipe for d in off) and max(losses.values()) > 6.0, losses
    # the default: those layers keep INT8 weights and floating-point activations, saying why
    gm, ex, _, _, on = run_passes(model, x, get_recipe(recipe))
    for d in on:
        if losses[d.module] > 6.0:
            assert d.scheme == "w8a16" and d.weight_only and d.fallback == "max_static_loss_db", d
            assert "against per-token scales" in d.reason and d.sqnr_db > 35, d
        else:
            assert d.scheme == recipe and not d.weight_only, d
    counts = qop_counts(gm)
    guarded = sum(losses[m] > 6.0 for m in losses)
    assert counts["linear_w8a16"] == guarded and counts["linear_w8a8"] == len(losses) - guarded
    assert any("INT8 weights, activations kept in floating point" in line
               for line in findings(on))
    # a floor no weight-only layer reaches either: the whole layer stays in floating point
    *_, floor = run_passes(model, x, get_recipe(recipe).replace(min_sqnr_db=90.0))
    assert all(d.scheme == FLOATING_POINT for d in floor)
    unguarded = run_passes(model, x, get_recipe(recipe).replace(max_static_loss_db=None))[0]
    assert token_sqnr_db(ref, gm(*ex)[0]) > token_sqnr_db(ref, unguarded(*ex)[0]) + 3.0


def test_fp8_static_scales_serve_massive_tokens():
    """FP8's exponent covers both kinds of token: no loss against per-token scales, no fallback."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 48)).eval()
    x = with_massive_tokens(torch.randn(4, 9, 48))
    calibrated(model, [x])
    *_, decisions = run_passes(model, x, get_recipe("fp8-static"))
    assert all(d.scheme == "fp8-static" and abs(d.static_loss_db) < 1.0 for d in decisions), decisions


def test_dynamic_recipes_measure_no_static_loss():
    torch.manual_seed(0)
    model = Block()
    x = with_massive_tokens(torch.randn(4, 9, 48))
    calibrated(model, [x])
    *_, decisions = run_passes(model, x, get_recipe("w8a8-smoothquant-dynamic"))
    assert all(d.scheme == "w8a8-smoothquant-dynamic" and d.static_loss_db is None for d in decisions)


@pytest.mark.parametrize("size", [0, 7, 3 * (1 << 20) + 5])
@pytest.mark.parametrize("nan_at", [None, -1])
def test_sqnr_sums_a_weight_sized_pair_in_chunks_with_the_same_result(size, nan_at):
    """``sqnr_db`` sums float64 chunks of a large pair (no whole float64 copy of an embedding
    table): the result is the one-shot float64 formula's, and a NaN anywhere still comes out."""
    import math

    g = torch.Generator().manual_seed(size)
    ref = torch.randn(size, generator=g)
    approx = ref + 1e-3 * torch.randn(size, generator=g)
    if nan_at is not None and size:
        approx[nan_at] = float("nan")
    noise = (ref.double() - approx.double()).pow(2).sum().item()
    signal = ref.double().pow(2).sum().item()
    got = sqnr_db(ref.reshape(-1, 1), approx.reshape(-1, 1))
    if math.isnan(noise):
        assert math.isnan(got)
    elif noise == 0:
        assert got == float("inf")
    else:
        assert got == pytest.approx(10 * math.log10(signal / noise), rel=1e-9)


@pytest.mark.parametrize("blocks", [1, 3, 7])
@pytest.mark.parametrize("nan_at", [None, (2, 5)])
def test_error_sums_over_column_blocks_give_the_whole_pairs_sqnr(blocks, nan_at):
    """``ErrorSums`` (a layer measured a block of output channels at a time) gives ``sqnr_db`` and
    ``token_sqnr_db`` of the whole pair, and a NaN in any block still comes out."""
    import math

    g = torch.Generator().manual_seed(blocks)
    ref = torch.randn(2, 9, 20, generator=g) * torch.logspace(0, 2, 9).reshape(1, 9, 1)  # rows of many sizes
    approx = ref + 1e-2 * torch.randn(ref.shape, generator=g)
    if nan_at is not None:
        approx[0, nan_at[0], nan_at[1]] = float("nan")
    sums = ErrorSums()
    for part in torch.tensor_split(torch.arange(20), blocks):
        sums.add(ref[..., part], approx[..., part])
    for got, want in ((sums.sqnr_db(), sqnr_db(ref, approx)), (sums.token_sqnr_db(), token_sqnr_db(ref, approx))):
        assert (math.isnan(got) and math.isnan(want)) if nan_at else got == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("recipe,guard", [("w8a8-static", None), ("w8a8-smoothquant", None), ("w4a16", None),
                                          ("w8a8-static", 0.0)])  # a guard of 0 dB: the weight-only fallback's SQNR
def test_a_layer_measured_in_blocks_has_the_sqnr_measured_whole(recipe, guard, monkeypatch):
    """The quantize pass measures a wide layer a block of output channels at a time (a tied
    ``lm_head`` whole would be a weight-sized float copy): the decisions' SQNR and static loss are
    those measured whole, up to float32 rounding: the float linears of a block are float32 GEMMs,
    and a BLAS may sum a column in another order for another number of columns (2e-7 relative on
    an AMD EPYC); a block lost or counted twice moves the SQNR by orders more."""
    from qcompiler.passes import quantize

    torch.manual_seed(0)
    model = Block()
    x = with_massive_tokens(torch.randn(4, 9, 48))
    calibrated(model, [x])
    r = get_recipe(recipe).replace(min_sqnr_db=None, max_static_loss_db=guard)
    *_, whole = run_passes(model, x, r)
    assert guard is None or any(d.weight_only for d in whole), whole
    monkeypatch.setattr(quantize, "MEASURE_BLOCK", 48 * 5)  # five output channels at a time
    *_, blocked = run_passes(model, x, r)
    assert [d.module for d in whole] == [d.module for d in blocked]
    for a, b in zip(whole, blocked):
        assert a.sqnr_db is not None and a.sqnr_db == pytest.approx(b.sqnr_db, rel=1e-6), (a.module, a.sqnr_db, b.sqnr_db)
        if a.static_loss_db is None:
            assert b.static_loss_db is None
        else:
            assert a.static_loss_db == pytest.approx(b.static_loss_db, rel=1e-6, abs=1e-4)  # dB, a difference of two
