"""Block-by-block quantization-aware training (``qcompiler.qat.blockwise``) on tiny models of many
architectures: it brings the quantized model's output closer to the float model's, the compiled model
then computes what the trained one does, and bad input is named."""
import pytest
import torch
from torch import nn

import qcompiler
import qcompiler.qat as qat
from conftest import rel_err
from qcompiler.errors import OptionError, TrainingError
from qcompiler.qat.prepare import qat_layers
from tiny_models import build, token_batch

W4 = {"recipe": "w4a16", "group_size": 32}


def _output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _error(model, batches) -> float:
    """The prepared model's output error against its float self, over ``batches``."""
    with torch.no_grad():
        got = [_output(model(**b)) for b in batches]
        with qat.teaching(model):
            want = [_output(model(**b)) for b in batches]
    return sum(rel_err(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "phi3", "gpt2", "bert", "mpnet"])
def test_blockwise_brings_the_output_closer_to_the_float_model(arch):
    model, vocab = build(arch)
    batches = [token_batch(vocab, 2, 16, seed=s) for s in range(4)]
    qat.prepare(model, W4)
    before = _error(model, batches)
    record = qat.blockwise(model, batches, epochs=16, lr=1e-4, progress=False, log=lambda *_: None)
    assert record["steps"] == 16 * len(batches) * len(record["blocks"]) > 0
    assert all(last < first for first, last in record["blocks"].values()), record["blocks"]
    assert _error(model, batches) < 0.9 * before
    if arch == "llama":  # weight-only INT4: after convert the compiled model is the trained one, bit for bit
        with torch.no_grad():
            want = _output(model(**batches[0]))
        qat.convert(model)
        fast = torch.compile(model, backend="qcompile", options={**W4, "target": "reference"})
        with torch.no_grad():
            assert torch.equal(_output(fast(**batches[0])), want)


def test_blockwise_with_bfloat16_matmuls_and_token_ids():
    model, vocab = build("llama")
    ids = token_batch(vocab, 8, 16)["input_ids"]
    qat.prepare(model, W4)
    before = _error(model, [{"input_ids": ids}])
    qat.blockwise(model, ids, epochs=16, batch_size=2, lr=1e-4, autocast=torch.bfloat16, progress=False,
                  log=lambda *_: None)
    assert _error(model, [{"input_ids": ids}]) < 0.9 * before


def test_blockwise_errors():
    mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    with pytest.raises(OptionError, match="was not prepared for quantization-aware training"):
        qat.blockwise(mlp, [torch.randn(2, 32)], log=lambda *_: None)
    qat.prepare(mlp, W4)
    with pytest.raises(OptionError, match="Sequential has none .* train it with qcompiler.qat.distill"):
        qat.blockwise(mlp, [torch.randn(2, 32)], progress=False, log=lambda *_: None)
    model, vocab = build("llama")
    qat.prepare(model, W4)
    with pytest.raises(OptionError, match=r"token ids as an integer tensor \[sequences, length\]"):
        qat.blockwise(model, torch.randn(2, 8), log=lambda *_: None)
    with pytest.raises(OptionError, match="epochs and batch_size must be positive"):
        qat.blockwise(model, [token_batch(vocab, 2, 8)], epochs=0, log=lambda *_: None)
    with torch.no_grad():  # (a NaN in q_proj would not do: CPU attention drops it)
        qat_layers(model)["model.layers.0.mlp.down_proj"].weight_scale[0] = float("nan")
    with pytest.raises(TrainingError, match=r"block-wise loss of 'model.layers.0' is nan at epoch 1"):
        qat.blockwise(model, [token_batch(vocab, 2, 8)], progress=False, log=lambda *_: None)
