"""The fused Triton attention kernel against float64 attention and the ``attention_q8`` reference:
odd sizes, GQA / MQA, causal, boolean and additive masks, one-query decode, fully masked rows and
NaN. Without a GPU it runs in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1)."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install 'qcompiler[gpu]')")

from qcompiler.ir import ops  # noqa: E402
from qcompiler.passes.sqnr import sqnr_db  # noqa: E402
from qcompiler.runtimes import triton_attention  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QDTYPES = {"int8": torch.int8, "fp8": ops.FP8}
FLOORS = {"int8": 33.0, "fp8": 24.0}   # against float64 attention, as the reference's own test
CASES = [  # (hq, hkv, lq, lk, d, mask, causal)
    (2, 2, 7, 13, 24, None, False),
    (4, 2, 5, 70, 16, "bool", False),     # GQA, keys across two tiles
    (4, 1, 19, 19, 32, None, True),       # MQA, causal, query rows across two tiles
    (2, 1, 1, 37, 64, "additive", False),  # decode: one query
    (2, 1, 150, 150, 16, None, True),     # causal over three 64-row tiles: later key tiles skipped
    (2, 2, 260, 260, 16, "bool", True),   # 128-row tiles (long prompts), causal and a mask
    (2, 2, 3, 150, 32, "additive", False),  # two whole key tiles (no bounds test) and an edge tile
]


def _inputs(seed, hq, hkv, lq, lk, d, mask, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, n, d, generator=g) for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    k = k + 2.0  # a channel offset for the smoothing to remove
    m = None
    if mask == "bool":
        m = torch.ones(2, 1, lq, lk, dtype=torch.bool)
        m[0, ..., lk - 9:] = False
    elif mask == "additive":
        m = torch.randn(2, hq, lq, lk, generator=g)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(q.to(dtype)), to(k.to(dtype)), to(v.to(dtype)), to(m)


@pytest.mark.parametrize("fmt", list(QDTYPES))
@pytest.mark.parametrize("case", CASES)
def test_kernel_against_float64_and_the_reference(fmt, case):
    hq, hkv, lq, lk, d, mask, causal = case
    q, k, v, m = _inputs(1, hq, hkv, lq, lk, d, mask)
    scale = d ** -0.5
    out = triton_attention.attention_q8(q, k, v, m, causal, scale, QDTYPES[fmt])
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal, scale=scale,
                                           attn_mask=m if m is None or m.dtype == torch.bool else m.double(),
                                           enable_gqa=True)
    ref = torch.ops.qcompile.attention_q8(q, k, v, m, causal, scale, QDTYPES[fmt])
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert sqnr_db(exact, out) > FLOORS[fmt]
    # the same quantized math but P rounded against the running row maximum (module docstring)
    assert sqnr_db(ref, out) > FLOORS[fmt] + 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_keep_their_dtype(dtype):
    q, k, v, m = _inputs(2, 2, 2, 6, 10, 16, "bool", dtype)
    out = triton_attention.attention_q8(q, k, v, m, False, None, torch.int8)
    ref = torch.ops.qcompile.attention_q8(q, k, v, m, False, None, torch.int8)
    assert out.dtype == dtype and sqnr_db(ref.float(), out.float()) > 30


def test_fully_masked_rows_are_zero_and_nan_never_passes():
    q, k, v, m = _inputs(3, 2, 2, 6, 10, 16, "bool")
    m[1, 0, 2, :] = False
    out = triton_attention.attention_q8(q, k, v, m, False, None, torch.int8)
    assert torch.equal(out[1, :, 2], torch.zeros_like(out[1, :, 2])) and torch.isfinite(out).all()
    q[0, 1, 3, 0] = float("nan")
    out = triton_attention.attention_q8(q, k, v, m, False, None, torch.int8)
    assert out[0, 1, 3].isnan().all()


def test_shapes_that_do_not_fit_are_named():
    q, k, v, _ = _inputs(0, 3, 2, 4, 8, 16, None)
    with pytest.raises(ValueError, match="not a multiple"):
        triton_attention.attention_q8(q, k, v, None, False, None, torch.int8)


def test_triton_target_runs_quantized_attention_as_the_kernel():
    import qcompiler
    from tiny_models import build, token_batch

    model, vocab = build("llama")
    model = model.to(DEVICE)
    batch = {k: v.to(DEVICE) for k, v in token_batch(vocab, 2, 9, padded=True).items()}
    outs = {}
    for target in ("reference", "triton"):
        torch._dynamo.reset()
        fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a16", "attention": "int8",
                                                                  "target": target})
        with torch.no_grad():
            outs[target] = fast(**batch).logits
        graph = qcompiler.api.backend.compiled_graphs(fast)[0]
        if target == "triton":
            targets = {str(n.target) for n in graph.graph_module.graph.nodes if n.op == "call_function"}
            assert "qcompile_triton.attention_q8.default" in targets, targets  # the kernel's op
    live = batch["attention_mask"].bool()
    assert sqnr_db(outs["reference"][live], outs["triton"][live]) > 30
