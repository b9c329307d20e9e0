"""Every user journey on tiny random-weight models of many transformers architectures (Llama,
Qwen2, Mistral, Phi3, Gemma3, GPT-2, BERT, MPNet): compile with ``dynamic=True`` and new shapes
on each target this machine has, a calibrated recipe, ``generate()`` for the decoders, and ONNX
export in both forms. No architecture may crash; each output stays close to FP32."""
import pytest
import torch

from qcompiler.passes.sqnr import sqnr_db
import qcompiler
from tiny_models import ARCHITECTURES, DECODERS, build, token_batch

# (batch, length, padded): the first call, then shapes the first compile never saw (batch 1 is
# generate()'s, covered below; Dynamo specializes it into a graph of its own)
SHAPES = [(2, 12, True), (3, 7, False), (4, 20, False)]
# CI runs every architecture through the default target and three through Inductor; -m slow all
INDUCTOR_IN_CI = ("llama", "bert")
# generate() in CI: a plain decoder, the mixed sliding-window one, and GPT-2's Conv1D layers
GENERATE_IN_CI = ("llama", "gemma3", "gpt2")
# W8A8 on 64-wide random-weight layers; real models measure far higher (test_real_models.py)
FLOOR_DB = 18.0


def _output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _compare(model, fast, batch):
    with torch.no_grad():
        ref, got = _output(model(**batch)), _output(fast(**batch))
    mask = batch["attention_mask"].bool()  # padded positions carry no meaning
    return sqnr_db(ref[mask], got[mask])


@pytest.mark.parametrize("arch,target", [(a, "auto") for a in ARCHITECTURES] + [
    pytest.param(a, "inductor", marks=() if a in INDUCTOR_IN_CI else pytest.mark.slow) for a in ARCHITECTURES])
def test_dynamic_compile_takes_new_shapes(arch, target):
    model, vocab = build(arch)
    fast = torch.compile(model, backend="qcompile", dynamic=True, options={"target": target})
    for i, (b, t, padded) in enumerate(SHAPES):
        assert _compare(model, fast, token_batch(vocab, b, t, seed=i, padded=padded)) > FLOOR_DB, (b, t)
    report = qcompiler.explain(fast)
    assert any(r.scheme == "w8a8" for r in report), str(report)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_calibrated_static_recipe(arch):
    model, vocab = build(arch)
    qcompiler.calibrate(model, [token_batch(vocab, 2, 16, seed=s) for s in range(2)], progress=False)
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a8-smoothquant", "alpha": "auto"})
    assert _compare(model, fast, token_batch(vocab, 2, 10, seed=7)) > FLOOR_DB - 3


@pytest.mark.parametrize("recipe", ["w4a16-gptq", "w4a16-awq"])
@pytest.mark.parametrize("arch", [a if a in ("llama", "gpt2") else pytest.param(a, marks=pytest.mark.slow)
                                  for a in DECODERS])
def test_calibrated_int4_algorithms(arch, recipe):
    """GPTQ and AWQ round every linear, GPT-2's Conv1D ones (weights stored [in, out]) included, and
    the compiled model computes what the prepared weights say: the same logits as the float model
    with each linear's weight replaced by its prepared INT4 weight, dequantized."""
    from qcompiler.calibration.state import linear_layers, linear_weight, prepared_for, stored_weight

    model, vocab = build(arch)
    options = {"recipe": recipe, "group_size": 32}
    qcompiler.calibrate(model, [token_batch(vocab, 2, 16, seed=s) for s in range(2)], recipe=options, progress=False)
    fast = torch.compile(model, backend="qcompile", options={**options, "target": "reference"})
    batch = token_batch(vocab, 2, 10, seed=7)
    with torch.no_grad():
        got = _output(fast(**batch))
    rows = [r for r in qcompiler.explain(fast) if r.op == "linear"]
    assert rows and all(r.scheme == recipe for r in rows if r.module != "lm_head"), [(r.module, r.scheme) for r in rows]
    # the float model on the prepared weights (AWQ's input scale folded back: W s / s)
    dequantized = {}
    for name, mod in linear_layers(model):
        p = prepared_for(mod.weight)
        if p is not None and p.weight is not None:
            w = p.weight.dequantize() if p.smooth_scale is None else p.weight.dequantize() / p.smooth_scale
            assert w.shape == linear_weight(mod).shape, name
            dequantized[mod] = w
    assert len(dequantized) == len([r for r in rows if r.scheme == recipe])
    saved = {mod: mod.weight.data.clone() for mod in dequantized}
    try:
        for mod, w in dequantized.items():
            mod.weight.data.copy_(stored_weight(mod, w))
        with torch.no_grad():
            expected = _output(model(**batch))
    finally:
        for mod, w in saved.items():
            mod.weight.data.copy_(w)
    assert sqnr_db(expected, got) > 60  # the same weights; only the order of float operations differs
    assert _compare(model, fast, batch) > 8  # INT4 on 64-wide random weights, against FP32


@pytest.mark.parametrize("arch", [a if a in GENERATE_IN_CI else pytest.param(a, marks=pytest.mark.slow)
                                  for a in DECODERS])
def test_generate_through_the_compiled_forward(arch):
    """Without ``dynamic=True`` (static, then automatic-dynamic graphs): every step's logits of a ``generate()`` through the compiled forward (prefill, then decode
    over the growing cache) close to the float model's on the same tokens (teacher-forced: no
    greedy near-tie between the two can make them diverge)."""
    model, vocab = build(arch)
    model.forward = torch.compile(model.forward, backend="qcompile")
    for length in (5, 9):
        prompt = token_batch(vocab, 1, length, seed=length)
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
            full = out.sequences
            eager = type(model).forward(model, input_ids=full, attention_mask=torch.ones_like(full)).logits
        assert full.shape == (1, length + 4)
        for step, logits in enumerate(out.logits):  # step i predicts token length + i
            assert sqnr_db(eager[:, length - 1 + step], logits) > FLOOR_DB, (length, step)
    assert all(r.scheme != "not compiled" for r in qcompiler.explain(model) if r.op == "linear")
    # every graph on the default target's runtime (a sliding-window cache returns its length: an
    # int output the ONNX file cannot hold once made it fall back)
    graphs = qcompiler.explain(model).graphs
    assert graphs and {g.running for g in graphs} == {"ort"}, graphs


@pytest.mark.parametrize("form,embedding", [("tensorrt", None), ("ort", None), ("tensorrt", "int8")])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_export_onnx_runs_in_onnx_runtime(arch, form, embedding, tmp_path):
    from qcompiler.runtimes.ort_session import OrtSession
    import onnx

    model, vocab = build(arch)
    example = token_batch(vocab, 2, 8)
    # a static recipe: TensorRT's explicit quantization takes constant activation scales only
    result = qcompiler.export_onnx(model, example, str(tmp_path / "m.onnx"), recipe="w8a8-smoothquant",
                                   form=form, calibration=[token_batch(vocab, 2, 16, seed=s) for s in range(2)],
                                   options={"embedding": embedding})
    assert result.violations == [], result.summary()
    tables = [d for d in result.decisions if d.op == "embedding"]
    assert bool(tables) == bool(embedding) and all(d.scheme != "floating point" for d in tables)
    session = OrtSession(onnx.load(str(tmp_path / "m.onnx")))
    batch = token_batch(vocab, 3, 11, seed=5)  # a shape the export did not see
    feeds = [batch[name] for name in session.input_names]
    got = session(*feeds)[0]
    with torch.no_grad():
        ref = _output(model(**batch))
    assert sqnr_db(ref, got) > FLOOR_DB - 3


@pytest.mark.parametrize("arch", [a if a in GENERATE_IN_CI else pytest.param(a, marks=pytest.mark.slow)
                                  for a in DECODERS])
def test_generate_compiles_prefill_and_decode_once_each(arch):
    """``dynamic=True`` (the README's way): the first ``generate()`` compiles the prefill and the
    decode graph, on the default target's ONNX Runtime sessions, and later prompt and cache lengths
    compile nothing. (Sliding-window models branch on whether a length exceeds the window, each
    side a graph of its own; the prompts here all exceed it.)"""
    from torch._dynamo.utils import counters

    model, vocab = build(arch)
    model.forward = torch.compile(model.forward, backend="qcompile", dynamic=True)
    counters.clear()
    compiled = []
    for length in (9, 12, 15):
        prompt = token_batch(vocab, 1, length, seed=length)
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
            eager = type(model).forward(model, **prompt).logits[:, -1]  # the class's forward: uncompiled
        assert out.sequences.shape == (1, length + 6)
        assert sqnr_db(eager, out.logits[0]) > FLOOR_DB, length
        compiled.append(counters["stats"]["unique_graphs"])
    assert compiled[1:] == [compiled[0]] * 2, compiled  # new lengths: no compile
    assert arch in ("mistral", "gemma3") or compiled[0] == 2, compiled  # sliding windows: more regimes
    graphs = qcompiler.explain(model).graphs
    assert graphs and {g.running for g in graphs} == {"ort"}, graphs
