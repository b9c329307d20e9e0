"""Attention that reads a quantized KV cache: the ``attention_quantized_kv`` reference against float64,
its fused Triton kernel against the reference (in Triton's CPU interpreter without a GPU: conftest
sets TRITON_INTERPRET=1), and the pass that fuses a compiled cache's read into the attention, in
``generate()`` of tiny models of several architectures on every target."""
import pytest
import torch
import torch.nn.functional as F

import qcompiler
from qcompiler.ir import kv
from qcompiler.passes.sqnr import sqnr_db

transformers = pytest.importorskip("transformers")
from tiny_models import assert_same_generation, build, token_batch  # noqa: E402

SCHEMES = list(kv.KV_FORMATS)
CASES = [  # (hq, hkv, lq, quantized tokens, tail tokens, head size, mask, causal)
    (2, 2, 7, 32, 5, 24, None, False),      # head size not a power of two, values in groups of 8
    (4, 2, 1, 64, 9, 16, "bool", False),    # decode: one query, GQA
    (4, 1, 19, 16, 3, 32, "additive", True),  # MQA, causal, additive mask
    (2, 1, 3, 96, 0, 64, None, False),      # no tail; keys across two tiles
    (2, 2, 5, 0, 11, 16, "bool", False),    # nothing quantized yet
    (2, 1, 150, 96, 54, 16, None, True),    # causal over three row tiles: key tiles past each skipped
]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FLOAT_LINEARS = {"recipe": "w8a16", "skip": ["*"]}  # compiled, every linear in floating point: the eager model's numbers


def _inputs(scheme, case, seed, dtype=torch.float32, group=16):
    hq, hkv, lq, lc, lt, d, mask, causal = case
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, hkv, lc + lt, d, generator=g) + torch.randn(d, generator=g) * 3  # outlier channels
    values = torch.randn(2, hkv, lc + lt, d, generator=g)
    q = torch.randn(2, hq, lq, d, generator=g)
    qk = kv.quantize(keys[..., :lc, :], scheme, "channel", group)
    qv = kv.quantize(values[..., :lc, :], scheme, "token", group)
    m = None
    if mask == "bool":
        m = torch.ones(2, 1, lq, lc + lt, dtype=torch.bool)
        m[0, ..., 2:9] = False
    elif mask == "additive":
        m = torch.randn(2, hq, lq, lc + lt, generator=g)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    args = (to(q.to(dtype)), to(qk.codes), to(qk.scale), to(qk.offset), to(keys[..., lc:, :].to(dtype)),
            to(qv.codes), to(qv.scale), to(qv.offset), to(values[..., lc:, :].to(dtype)), to(m), causal, None,
            scheme, qk.group, qv.group)
    return args, qk, qv, keys, values


def _float64(args, qk, qv):
    """The definition: float64 dequantization (``kv.reference_dequantize``), concatenation, attention."""
    q, *_, k_tail, _, _, _, v_tail, m, causal, scale = args[:12]
    k = torch.cat([kv.reference_dequantize(qk).to(q.device), k_tail.double()], dim=-2)
    v = torch.cat([kv.reference_dequantize(qv).to(q.device), v_tail.double()], dim=-2)
    m = m if m is None or m.dtype == torch.bool else m.double()
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=m, is_causal=causal, scale=scale,
                                          enable_gqa=True)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("case", CASES)
def test_reference_is_the_definition(scheme, case):
    for seed in (0, 1):  # fresh inputs each time
        args, qk, qv, *_ = _inputs(scheme, case, seed)
        out = torch.ops.qcompile.attention_quantized_kv(*args)
        assert out.shape == args[0].shape and out.dtype == torch.float32
        assert sqnr_db(_float64(args, qk, qv), out) > 100  # float32 rounding only


triton_kv_attention = pytest.importorskip(
    "qcompiler.runtimes.triton_kv_attention", reason="the Triton kernels need the triton package (pip install 'qcompiler[gpu]')")


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("case", CASES)
def test_kernel_against_the_reference_and_float64(scheme, case):
    args, qk, qv, *_ = _inputs(scheme, case, 2)
    out = triton_kv_attention.attention_quantized_kv(*args)
    ref = torch.ops.qcompile.attention_quantized_kv(*args)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert sqnr_db(ref, out) > 100
    assert sqnr_db(_float64(args, qk, qv), out) > 100


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("case", [c for c in CASES if c[0] // c[1] * c[2] <= 64])  # the split-KV kernel's calls
@pytest.mark.parametrize("splits", [1, 2, 3, 7])  # 1: the slice writes the output, no merge
def test_split_kv_slices_merge_to_the_reference(scheme, case, splits):
    # slices end inside the quantized tokens, on the boundary to the tail, inside the tail, and
    # past the keys (empty slices); masked and causal rows across slices
    args, qk, qv, *_ = _inputs(scheme, case, 5)
    out = triton_kv_attention.attention_split(*args, splits=splits)
    ref = torch.ops.qcompile.attention_quantized_kv(*args)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert sqnr_db(ref, out) > 100
    assert sqnr_db(_float64(args, qk, qv), out) > 100


def test_split_kv_keeps_masked_rows_zero_and_nan():
    args, *_ = _inputs("int4", CASES[1], 6)
    args = list(args)
    args[9] = args[9].clone()
    args[9][1, 0, 0, :] = False
    for splits in (1, 4):
        out = triton_kv_attention.attention_split(*args, splits=splits)
        assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0])) and torch.isfinite(out).all()
        for where in (0, 2, 8):  # the query, a key scale, the value tail
            bad = list(args)
            bad[where] = bad[where].clone()
            bad[where][0, 0, 0, 0] = float("nan")
            assert triton_kv_attention.attention_split(*bad, splits=splits)[0].isnan().any(), where


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_half_precision_keeps_its_dtype(dtype, scheme):
    args, qk, qv, *_ = _inputs(scheme, CASES[1], 3, dtype)
    out = triton_kv_attention.attention_quantized_kv(*args)
    ref = torch.ops.qcompile.attention_quantized_kv(*args)
    assert out.dtype == dtype
    # products on half-precision operands, float32 accumulation: the reference's SDPA rounds alike
    assert sqnr_db(ref.float(), out.float()) > 35
    assert sqnr_db(_float64(args, qk, qv), out.float()) > 35


def test_fully_masked_rows_are_zero_and_nan_never_passes():
    args, *_ = _inputs("int8", CASES[1], 4)
    args = list(args)
    args[9] = args[9].clone()
    args[9][1, 0, 0, :] = False
    out = triton_kv_attention.attention_quantized_kv(*args)
    assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0])) and torch.isfinite(out).all()
    for where in (0, 4, 8):  # a NaN in the query, in the key tail, in the value tail
        bad = list(args)
        bad[where] = bad[where].clone()
        bad[where][0, 0, 0, 0] = float("nan")
        out = triton_kv_attention.attention_quantized_kv(*bad)
        assert out[0, 0].isnan().any(), where
    bad = list(args)
    bad[2] = bad[2].clone()
    bad[2][0, 0, 0, 0] = float("nan")  # a NaN scale of the quantized keys
    assert triton_kv_attention.attention_quantized_kv(*bad)[0].isnan().any()


def test_shapes_that_do_not_fit_are_named():
    args, *_ = _inputs("int8", CASES[0], 0)
    bad = list(args)
    bad[0] = bad[0][..., :16]
    with pytest.raises(ValueError, match="head size"):
        triton_kv_attention.attention_quantized_kv(*bad)
    bad = list(args)
    bad[0] = torch.randn(2, 3, 7, 24, device=DEVICE)
    with pytest.raises(ValueError, match="not a multiple"):
        triton_kv_attention.attention_quantized_kv(*bad)


def _graph_targets(model) -> list:
    return [{str(n.target) for n in g.graph_module.graph.nodes if n.op == "call_function"}
            for g in qcompiler.api.backend.compiled_graphs(model)]


def _generate(arch, scheme, options, padded=False, new_tokens=8, dynamic=None):
    """Greedy generation with the same quantized cache settings, eager then compiled; returns the
    compiled model, after checking that both generate the same (``assert_same_generation``)."""
    model, vocab = build(arch)
    prompt = token_batch(vocab, 2 if padded else 1, 40, seed=3, padded=padded)
    outs = []
    with torch.no_grad():
        for compiled in (False, True):
            m = build(arch)[0]
            if compiled:
                torch._dynamo.reset()
                m.forward = torch.compile(m.forward, backend="qcompile", options=options, dynamic=dynamic)
            cache = qcompiler.QuantizedKVCache(m.config, scheme, group_size=16, residual=8)
            outs.append(m.generate(**prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, cache=cache,
                                   output_logits=True, return_dict_in_generate=True))
            assert cache.quantized_nbytes > 0
    assert_same_generation(*outs, start=prompt["input_ids"].shape[1])
    return m


@pytest.mark.parametrize("arch,scheme", [("llama", "int8"), ("llama", "fp8"), ("llama", "int4"), ("qwen2", "int8"),
                                         ("phi3", "int4"), ("gemma3", "fp8"), ("gpt2", "int4")])
def test_compiled_decode_reads_the_codes_in_the_attention(arch, scheme):
    """Every decode graph's attention over a quantized layer is the fused op; no cache read is left
    as a separate dequantization; generation matches eager with the same cache (``_generate``)."""
    model = _generate(arch, scheme, dict(FLOAT_LINEARS, target="reference"), padded=arch == "llama")
    graphs = _graph_targets(model)
    decode = [g for g in graphs if "qcompile.attention_quantized_kv.default" in g]
    assert decode, graphs
    assert not any("qcompile.kv_dequantize" in g for g in graphs)
    assert "attention fused with the read of its quantized KV cache" in str(qcompiler.explain(model))


@pytest.mark.parametrize("target,scheme", [("inductor", "int8"), ("ort", "int8"), ("ort", "int4"), ("triton", "int4"),
                                           ("triton", "fp8")])  # inductor with int4: the dynamic=True test
def test_every_target_runs_the_fused_op(target, scheme):
    if target == "triton":
        from qcompiler.runtimes.triton_support import available

        if not available(torch.device("cpu")):
            pytest.skip("the triton target needs a GPU or TRITON_INTERPRET=1")
    model = _generate("llama", scheme, dict(FLOAT_LINEARS, target=target), new_tokens=4)
    report = str(qcompiler.explain(model))
    assert f"runs on {target}" in report and "attention fused with the read" in report
    if target == "triton":
        assert any("qcompile_triton.attention_quantized_kv.default" in g for g in _graph_targets(model))


def test_dynamic_shapes_generate_and_read_the_codes_in_the_attention():
    """dynamic=True: the cache's update traces with a symbolic head size (no graph break in it), and
    decode reads the codes in the attention."""
    model = _generate("llama", "int4", dict(FLOAT_LINEARS, target="inductor"), new_tokens=6, dynamic=True)
    report = str(qcompiler.explain(model))
    assert "attention fused with the read" in report
    assert all("runs on inductor" in line for line in report.splitlines() if line.startswith("graph "))


def test_quantized_attention_reads_the_cache_through_a_float_copy():
    """attention="int8" on top of a quantized cache: the q-op takes the dequantized keys and values
    (the fused op is floating-point attention); generation runs and the report says which."""
    model, vocab = build("llama")
    prompt = token_batch(vocab, 1, 40, seed=3)
    with torch.no_grad():
        model.forward = torch.compile(model.forward, backend="qcompile",
                                      options={"recipe": "w8a8", "attention": "int8", "target": "reference"})
        cache = qcompiler.QuantizedKVCache(model.config, "int8", group_size=16, residual=8)
        model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, cache=cache)
    graphs = _graph_targets(model)
    assert all("qcompile.attention_quantized_kv.default" not in g for g in graphs)
    assert any("qcompile.kv_dequantize" in g and "qcompile.attention_q8.default" in g for g in graphs)
