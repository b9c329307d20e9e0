"""Block-wise calibration replays each block on exactly the inputs the real forward gives it: its
own masks and position arguments (models mixing sliding-window and full attention), blocks called
with keyword arguments or returning tuples / dicts, batches as the user passes them (cache on)."""
import pytest
import torch
from torch import nn

from qcompiler.calibration import blockwise
from qcompiler.passes.sqnr import sqnr_db
import qcompiler
from tiny_models import build, token_batch


def _block_outputs(blocks, run):
    """Every output of each block while ``run()`` executes: {block index: [tensors]}."""
    seen = {i: [] for i in range(len(blocks))}
    hooks = [b.register_forward_hook(lambda m, a, out, _i=i: seen[_i].append(blockwise._hidden_output(out).clone()))
             for i, (_, b) in enumerate(blocks)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2", "mistral", "gpt2"])
def test_replay_with_float_weights_equals_the_real_forward(arch):
    model, vocab = build(arch)
    batches = [token_batch(vocab, 2, 20, seed=s) for s in range(2)]  # longer than the sliding window
    blocks = blockwise.find_blocks(model)
    with torch.no_grad():
        real = _block_outputs(blocks, lambda: [model(**b, use_cache=False) for b in batches])
    # handle returns no new weights: the replay runs the float blocks, and must match exactly
    replay = _block_outputs(blocks, lambda: blockwise.run(model, batches, lambda name, lins: {},
                                                          need_hessian=False, max_rows=64, progress=False))
    for i in range(len(blocks) - 1):  # the FP pass stops at the last block; replay runs every block twice
        outs = replay[i][-2 * len(batches):]  # the statistics pass, then the next-input pass
        for got, want in zip(outs, real[i] + real[i]):
            err = ((got - want).norm() / want.norm()).item()
            assert err < 1e-5, (arch, i, err)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
@pytest.mark.parametrize("recipe", ["w4a16-gptq", "w4a16-awq"])
def test_weight_algorithms_calibrate_on_batches_that_use_the_cache(arch, recipe):
    """The batches as a user passes them (no use_cache=False): the cache-sized masks of a
    sliding-window model crashed the replay."""
    model, vocab = build(arch)
    batches = [token_batch(vocab, 2, 24, seed=s) for s in range(2)]
    qcompiler.calibrate(model, batches, recipe={"recipe": recipe, "group_size": 32}, progress=False)
    fast = torch.compile(model, backend="qcompile", options={"recipe": recipe, "group_size": 32,
                                                              "target": "reference"})
    with torch.no_grad():
        got, ref = fast(**batches[0]).logits, model(**batches[0]).logits
    # INT4 g32 weights on 64-wide random layers: well above noise, far below what real models reach
    assert sqnr_db(ref, got) > 12, (arch, recipe, sqnr_db(ref, got))


class KeywordBlock(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, hidden_states=None, scale=None):
        return {"hidden": hidden_states + self.lin(hidden_states) * scale}


class KeywordModel(nn.Module):
    """Calls its blocks with keyword arguments only; blocks return dicts."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(KeywordBlock() for _ in range(3))
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(hidden_states=x, scale=torch.tensor(0.5 + i))["hidden"]
        return self.head(x)


def test_blocks_called_with_keywords_returning_dicts():
    torch.manual_seed(0)
    model = KeywordModel().eval()
    batches = [torch.randn(2, 5, 32) for _ in range(2)]
    qcompiler.calibrate(model, batches, recipe={"recipe": "w4a16-gptq", "group_size": 32}, progress=False)
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w4a16-gptq", "group_size": 32,
                                                              "target": "reference"})
    ref, got = model(batches[0]), fast(batches[0])
    assert ((got - ref).norm() / ref.norm()).item() < 0.2
    assert {r.scheme for r in qcompiler.explain(fast) if r.op == "linear"} == {"w4a16-gptq"}
