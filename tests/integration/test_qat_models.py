"""Quantization-aware training on tiny models of many architectures: the prepared model in eval mode
computes what the compiled model computes after convert (per recipe), the trained values reach the
compressed-tensors checkpoint, and distill under DistributedDataParallel (two CPU processes, gloo)
trains as one process does on the same global batch."""
import os
import socket

import pytest
import torch

import qcompiler
import qcompiler.qat as qat
from qcompiler.passes.sqnr import sqnr_db
from qcompiler.qat.prepare import qat_layers
from tiny_models import ARCHITECTURES, build, token_batch

WEIGHT_ONLY = [{"recipe": "w4a16", "group_size": 32}, {"recipe": "w4a16", "group_size": 32, "symmetric": False},
               {"recipe": "w8a16"}, {"recipe": "w4a16-gptq", "group_size": 32}, {"recipe": "w4a16-awq", "group_size": 32}]
WITH_ACTIVATIONS = [{"recipe": "w8a8"}, {"recipe": "fp8"}, {"recipe": "w8a8-static"}]
CASES = [(a, o) for a in ("llama", "gpt2") for o in WEIGHT_ONLY + WITH_ACTIVATIONS] + \
    [(a, {"recipe": "w4a16", "group_size": 32, "symmetric": False}) for a in ARCHITECTURES if a not in ("llama", "gpt2")] + \
    [(a, {"recipe": "w8a8"}) for a in ("qwen2", "bert")]


def _output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _prepared(arch: str, options: dict, batch: dict):
    """A tiny model calibrated as the recipe needs, prepared, its scales moved off their start (so a
    compile that ignored the trained values would not match)."""
    model, _ = build(arch)
    recipe = qcompiler.recipes.resolve(options)
    if recipe.needs_calibration:
        qcompiler.calibrate(model, [batch], recipe=options if recipe.rounds_weights else None, progress=False)
    qat.prepare(model, options)
    with torch.no_grad():
        for q in qat_layers(model).values():
            q.weight_scale.mul_(1.0 + 0.1 * torch.rand_like(q.weight_scale))
            if q.input_scale is not None:
                q.input_scale.mul_(0.9)
    return model


@pytest.mark.parametrize("arch,options", CASES, ids=lambda v: v if isinstance(v, str) else "-".join(
    f"{x}" for x in v.values()))
def test_prepared_model_computes_what_the_compiled_model_computes(arch, options):
    """Weight-only recipes: equal, bit for bit (the same dequantized weight, the same F.linear).
    Activation recipes: the reference target multiplies 8-bit codes exactly (float64) where the
    fake quantization multiplies their float32 values, and adds the static recipe's NaN carrier; a
    code can flip where that rounding meets a tie, so the bar is an output SQNR of 40 dB."""
    _, vocab = build(arch)
    batch = token_batch(vocab, 2, 16)
    model = _prepared(arch, options, batch)
    with torch.no_grad():
        want = _output(model(**batch))
    layers = list(qat_layers(model))
    qat.convert(model)
    fast = torch.compile(model, backend="qcompile", options={**options, "target": "reference"})
    with torch.no_grad():
        got = _output(fast(**batch))
    trained = [d.module for d in qcompiler.explain(fast) if "trained (qcompiler.qat" in (d.reason or "")]
    # every trained layer compiled with its trained values (explain prefixes the graph's index), no other
    assert len(trained) == len(layers) and all(any(t == n or t.endswith("." + n) for n in layers) for t in trained)
    if options in WEIGHT_ONLY:
        assert torch.equal(got, want)
    else:
        assert sqnr_db(want, got) > 40.0


def test_trained_checkpoint_loads_in_transformers_with_the_same_outputs(tmp_path):
    """export_checkpoint writes the trained codes and scales; transformers' model from the folder
    computes what the compiled model computes (W4A16: the same dequantized weights)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    options = {"recipe": "w4a16", "group_size": 32}
    _, vocab = build("llama")
    batch = token_batch(vocab, 2, 16)
    model = _prepared("llama", options, batch)
    qat.convert(model)
    qcompiler.export_checkpoint(model, tmp_path / "ckpt", recipe=options)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    fast = torch.compile(model, backend="qcompile", options={**options, "target": "reference"})
    with torch.no_grad():
        want, got = fast(**batch).logits, loaded(**batch).logits
    assert sqnr_db(want, got) > 80.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STEPS, LR = 2, 1e-3


def _train(rank: int, world: int, port: int, out: str):
    """One process of the DDP run (world 2) or the single reference process (world 1)."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    torch.set_num_threads(1)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world)
    model, vocab = build("llama")
    qat.prepare(model, {"recipe": "w4a16", "group_size": 32})
    trained = model if world == 1 else torch.nn.parallel.DistributedDataParallel(model)
    ids = token_batch(vocab, 32, 12, seed=5)["input_ids"]
    record = qat.distill(trained, ids, steps=STEPS, batch_size=4, lr=LR, progress=False, log=lambda *_: None)
    losses = torch.tensor(record["losses"])
    if world > 1:  # each process's loss is its half of the global batch's mean
        torch.distributed.all_reduce(losses)
        losses /= world
        torch.distributed.destroy_process_group()
    torch.save({"params": {n: p.detach() for n, p in model.named_parameters()}, "losses": losses},
               f"{out}-{world}-{rank}.pt")


def test_distill_under_ddp_matches_one_process(tmp_path):
    """Two gloo processes, each on its half of every global batch, train to the parameters one process
    reaches on the whole batch. Adam's first steps move each value by about ``lr`` in the sign of
    its gradient, so processes that did not average their gradients (or saw the same rows twice)
    would differ from the single run in a large share of values; averaged gradients differ only by
    float rounding, which can flip the sign of near-zero gradients alone."""
    out = str(tmp_path / "run")
    torch.multiprocessing.spawn(_train, args=(2, _free_port(), out), nprocs=2)
    _train(0, 1, 0, out)
    one, ranks = torch.load(f"{out}-1-0.pt"), [torch.load(f"{out}-2-{r}.pt") for r in range(2)]
    assert torch.allclose(ranks[0]["losses"], one["losses"], rtol=1e-4)
    far, total = 0, 0
    for name, p in one["params"].items():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name  # DDP keeps them equal
        far += ((ranks[0]["params"][name] - p).abs() > LR / 2).sum().item()
        total += p.numel()
    assert far / total < 1e-3, f"{far} of {total} values differ by more than lr/2"
