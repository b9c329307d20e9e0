"""The quantized KV cache: KIVI quantization against its float64 definition (fuzzed shapes and
groups), the cache's residual window, memory accounting and errors, and the cache inside
``forward`` and ``generate`` of tiny models of many architectures, eager and compiled."""
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import qcompiler
from qcompiler.errors import OptionError
from qcompiler.ir import kv

transformers = pytest.importorskip("transformers")
from qcompiler.api.kv_cache import QuantizedKVLayer, float_bytes_per_token  # noqa: E402
from tiny_models import assert_same_generation, build, token_batch  # noqa: E402

SCHEMES = list(kv.KV_FORMATS)


def _error_bound(x: torch.Tensor, q: kv.QuantizedKV) -> torch.Tensor:
    """Per element: how far a correct dequantization may be from ``x`` (float64)."""
    # the scale broadcast to every element: the definition applied to codes of 1
    unit = kv.QuantizedKV(torch.ones(x.shape, dtype=torch.int8), q.scale, None, kv.KV_FORMATS["int8"], q.per, q.group)
    scale = kv.reference_dequantize(unit)
    if q.fmt.name == "fp8":  # 3 mantissa bits: half an ulp relative, and subnormals of 2**-9 in scale units
        return x.double().abs() * 2.0 ** -4 + scale * 2.0 ** -10
    bound = 0.5 * scale * (1 + 1e-6)
    if q.offset is not None:  # the float16 offset may sit above the group's minimum by its rounding
        bound = bound + x.double().abs() * 2.0 ** -10
    return bound


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(scheme=st.sampled_from(SCHEMES), per=st.sampled_from(kv.PER), batch=st.integers(1, 2),
       heads=st.integers(1, 3), blocks=st.integers(1, 3), group=st.sampled_from([4, 16, 32]),
       head_dim=st.sampled_from([8, 16, 64, 80]), seed=st.integers(0, 2**16), outliers=st.booleans())
@example(scheme="int4", per="token", batch=1, heads=1, blocks=3, group=32, head_dim=8, seed=2112, outliers=True)
def test_quantize_matches_its_definition(scheme, per, batch, heads, blocks, group, head_dim, seed, outliers):
    g = torch.Generator().manual_seed(seed)
    length = blocks * group
    x = torch.randn(batch, heads, length, head_dim, generator=g)
    if outliers:  # keys' outlier channels: a large offset and scale on a few channels
        x[..., :2] = x[..., :2] * 20 + 50
    q = kv.quantize(x, scheme, per, group)
    ref = kv.reference_dequantize(q)
    assert torch.isfinite(ref).all()
    assert ((ref - x.double()).abs() <= _error_bound(x, q)).all()
    # the fast dequantization is the definition rounded once to float32 (code x scale is exact in
    # float32; INT4's offset addition rounds), also written into a slice of a larger buffer
    assert torch.equal(kv.dequantize(q), ref.float())
    buf = torch.full((batch, heads, length + 3, head_dim), float("nan"))
    kv.dequantize(q, out=buf[..., 1:length + 1, :])
    assert torch.equal(buf[..., 1:length + 1, :], ref.float()) and buf[..., 0, :].isnan().all()
    assert q.nbytes == sum(t.numel() * t.element_size() for t in (q.codes, q.scale, q.offset) if t is not None)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("per", kv.PER)
def test_nan_never_passes(scheme, per):
    x = torch.randn(1, 2, 32, 16)
    x[0, 1, 5, 3] = float("nan")
    out = kv.dequantize(kv.quantize(x, scheme, per, 16))
    assert out.isnan().any() and not out[0, 0].isnan().any()


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="whole blocks of 16 tokens"):
        kv.quantize(torch.randn(1, 1, 20, 16), "int8", "channel", 16)
    with pytest.raises(ValueError, match="unknown KV-cache scheme 'int2'"):
        kv.quantize(torch.randn(1, 1, 16, 16), "int2", "token", 16)
    with pytest.raises(ValueError, match="head size 15 is odd"):
        kv.quantize(torch.randn(1, 1, 16, 15), "int4", "token", 16)
    model, _ = build("llama")
    with pytest.raises(OptionError, match="valid schemes"):
        qcompiler.QuantizedKVCache(model.config, "int3")
    with pytest.raises(OptionError, match="power of two"):
        qcompiler.QuantizedKVCache(model.config, "int8", group_size=48)
    with pytest.raises(OptionError, match="residual"):
        qcompiler.QuantizedKVCache(model.config, "int8", residual=-1)


@pytest.mark.parametrize("scheme,group,bar", [("int8", 64, 0.27), ("fp8", 64, 0.27), ("int4", 32, 0.16)])
def test_memory_per_token_against_float32(scheme, group, bar):
    """SmolLM2's geometry (head size 64): the quantized part, scales included, against float32."""
    assert kv.bytes_per_token(scheme, 64, group) / (2 * 64 * 4) <= bar


@pytest.mark.parametrize("residual,group", [(0, 8), (8, 16), (20, 4)])
def test_residual_window_and_accounting(residual, group):
    layer = QuantizedKVLayer("int4", group, residual)
    seen = 0
    for n in (13, 1, 1, 30, 1, 7):
        k, v = torch.randn(2, 2, n, 16), torch.randn(2, 2, n, 16)
        keys, values = layer.update(k, v)
        seen += n
        assert keys.shape == values.shape == (2, 2, seen, 16)
        assert torch.equal(keys[..., -n:, :], k) and torch.equal(values[..., -n:, :], v)  # new tokens exact
        tail = layer.keys.shape[-2]
        assert layer.get_seq_length() == seen and layer.quantized_length % group == 0
        assert tail >= min(residual, seen) and tail < residual + group
    expect = sum(q.nbytes for q in (layer.qkeys, layer.qvalues)) + 2 * layer.keys.numel() * 4
    assert layer.nbytes == expect
    per_token = layer.quantized_nbytes / (2 * 2 * layer.quantized_length)  # batch 2, 2 heads
    assert per_token == kv.bytes_per_token("int4", 16, group)


def _chunked_logits(model, ids, cache, chunk):
    out = [model(input_ids=ids[:, s:s + chunk], cache=cache, use_cache=True).logits for s in range(0, ids.shape[1], chunk)]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma3", "gpt2", "mistral"])
@pytest.mark.parametrize("scheme,floor_db", [("int8", 35.0), ("fp8", 25.0), ("int4", 15.0)])
def test_cache_in_forward_stays_close_to_the_float_cache(arch, scheme, floor_db):
    from qcompiler.passes.sqnr import sqnr_db

    model, vocab = build(arch)
    ids = token_batch(vocab, 2, 96, seed=5)["input_ids"]
    with torch.no_grad():
        ref = _chunked_logits(model, ids, transformers.DynamicCache(config=model.config), 16)
        cache = qcompiler.QuantizedKVCache(model.config, scheme, group_size=16, residual=16)
        got = _chunked_logits(model, ids, cache, 16)
    assert sqnr_db(ref, got) > floor_db
    quantized = [layer for layer in cache.layers if isinstance(layer, QuantizedKVLayer)]
    if arch == "mistral":  # every layer has a sliding window: transformers' own float window
        assert not quantized and cache.quantized_nbytes == 0
    else:
        assert quantized and all(layer.quantized_length == 80 for layer in quantized)
        assert cache.nbytes < sum(2 * 2 * layer.get_seq_length() * layer.keys.shape[1] * layer.keys.shape[-1] * 4
                                  for layer in cache.layers)


def _log_likelihood(model, sequences, prompt_mask, start):
    """Sum of log-probabilities of ``sequences[:, start:]`` under ``model`` with a float cache."""
    mask = torch.cat([prompt_mask, torch.ones_like(sequences[:, start:])], dim=1)
    logp = model(input_ids=sequences, attention_mask=mask).logits.double().log_softmax(-1)
    picked = logp[:, start - 1:-1].gather(-1, sequences[:, start:, None])[..., 0]
    return picked.sum(-1)


@pytest.mark.parametrize("scheme,floor_db", [("int8", 35.0), ("fp8", 25.0), ("int4", 15.0)])
def test_generate_eager_greedy_and_beam_search(scheme, floor_db):
    """``generate()`` with the quantized cache: each greedy step's logits close to the float
    model's on the same tokens (teacher-forced), and beam search's scores of its sequences close
    to their float scores (the score formula checked first against the float cache's beams)."""
    from qcompiler.passes.sqnr import sqnr_db

    model, vocab = build("llama")
    prompt = token_batch(vocab, 2, 40, seed=3, padded=True)
    start, new = 40, 24
    with torch.no_grad():
        cache = qcompiler.QuantizedKVCache(model.config, scheme, group_size=16, residual=8)
        out = model.generate(**prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                             cache=cache, output_logits=True, return_dict_in_generate=True)
        assert out.sequences.shape == (2, start + new) and cache.quantized_nbytes > 0
        mask = torch.cat([prompt["attention_mask"], torch.ones_like(out.sequences[:, start:])], dim=1)
        eager = model(input_ids=out.sequences, attention_mask=mask).logits
        got = torch.stack(out.logits, dim=1)  # [2, new, vocab]: step i predicts token start + i
        assert sqnr_db(eager[:, start - 1:-1], got) > floor_db
        scores = {}
        for kind in ("float", scheme):
            cache = None if kind == "float" else qcompiler.QuantizedKVCache(model.config, scheme, group_size=16,
                                                                            residual=8)
            beams = model.generate(**prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=2,
                                   pad_token_id=0, cache=cache, output_scores=True, return_dict_in_generate=True)
            assert beams.sequences.shape == (2, start + new)
            # length_penalty 1: a beam's score is its summed log-probability over its generated length
            recomputed = _log_likelihood(model, beams.sequences, prompt["attention_mask"], start) / new
            scores[kind] = (beams.sequences_scores.double(), recomputed)
        torch.testing.assert_close(*scores["float"], rtol=1e-4, atol=1e-4)  # the formula is right
        quantized, float_score = scores[scheme]
        assert (quantized - float_score).abs().max() < 10 ** (-floor_db / 20), (scheme, quantized, float_score)


def test_generate_compiled_matches_eager_with_the_same_cache():
    """The compiled forward traces through the cache's update as one graph (no graph break) and
    generates what the eager model generates with the same quantized cache."""
    model, vocab = build("llama")
    prompt = token_batch(vocab, 1, 40, seed=3)
    recipe = {"recipe": "w8a16", "target": "inductor"}
    with torch.no_grad():
        cache = qcompiler.QuantizedKVCache(model.config, "int8", group_size=16, residual=8)
        model(**prompt, cache=cache)
        explained = torch._dynamo.explain(model)(input_ids=torch.tensor([[5]]), cache=cache)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        torch._dynamo.reset()
        fast = build("llama")[0]
        fast.forward = torch.compile(fast.forward, backend="qcompile", options=recipe)
        ref = torch.compile(model.forward, backend="qcompile", options=dict(recipe, target="reference"))
        model.forward = ref
        outs = []
        for m in (model, fast):
            cache = qcompiler.QuantizedKVCache(m.config, "int8", group_size=16, residual=8)
            outs.append(m.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=0, cache=cache,
                                   output_logits=True, return_dict_in_generate=True))
            assert cache.quantized_nbytes > 0
    # once a block of the cache is quantized, a key or value on a rounding boundary may take the
    # next INT8 code on one target and not the other: one code step is about 43 dB here
    assert_same_generation(*outs, start=prompt["input_ids"].shape[1], floor_db=38.0)


def test_float_bytes_per_token_reads_the_config():
    model, _ = build("llama")  # 2 layers, 2 KV heads of 16
    assert float_bytes_per_token(model.config) == 2 * 2 * 2 * 16 * 4


def test_crop_is_refused_with_the_fix():
    layer = QuantizedKVLayer("int8", 16, 8)
    layer.update(torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 16))
    with pytest.raises(NotImplementedError, match="float cache"):
        layer.crop(-3)


def test_recipe_option_kv_cache_quantizes_the_cache_of_compiled_generation():
    """options={"kv_cache": ...}: generate() with the compiled forward ends with a quantized cache,
    and generates what an explicit QuantizedKVCache of the same settings generates."""
    model, vocab = build("llama")
    prompt = token_batch(vocab, 1, 40, seed=4)
    settings = {"recipe": "w8a16", "kv_cache": "int8", "kv_group_size": 16, "kv_residual": 8}
    with torch.no_grad():
        ref_model = build("llama")[0]
        ref_model.forward = torch.compile(ref_model.forward, backend="qcompile",
                                          options={"recipe": "w8a16", "target": "reference"})
        cache = qcompiler.QuantizedKVCache(ref_model.config, "int8", group_size=16, residual=8)
        ref = ref_model.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=0, cache=cache,
                                 output_logits=True, return_dict_in_generate=True)
        model.forward = torch.compile(model.forward, backend="qcompile", options=dict(settings, target="inductor"))
        out = model.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
    final = out.cache if "cache" in out else out.past_key_values
    assert isinstance(final, qcompiler.QuantizedKVCache) and final.quantized_nbytes > 0
    assert_same_generation(out, ref, start=prompt["input_ids"].shape[1], floor_db=38.0)  # as above: a KV code may flip
    assert any("KV cache: int8" in line for line in str(qcompiler.explain(model)).splitlines())


def test_recipe_option_kv_cache_without_a_transformers_model_names_the_fix():
    lin = torch.nn.Linear(8, 8)
    fast = torch.compile(lin, backend="qcompile", options={"kv_cache": "int8"})
    with pytest.raises(OptionError, match="QuantizedKVCache"):
        fast(torch.randn(2, 8))
