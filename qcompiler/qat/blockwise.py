"""``qcompiler.qat.blockwise``: train a prepared model one block at a time (EfficientQAT's Block-AP).

Before end-to-end distillation, each of the model's repeated blocks (a transformer's layers, as
block-wise calibration finds them) trains on its own: its quantized linears' weights and scales
learn to make the block's output, from the input the blocks before it *as trained and quantized*
give, match the floating-point block's output from the floating-point input (squared error
relative to the target's). One floating-point pass records every block's call (masks, position
embeddings) and the first block's input; then each block needs only its own forward and backward
over cached hidden states, with no output head and no vocabulary-sized loss, so a token costs a
fraction of an end-to-end step and the data can be seen several times (``epochs``). Chen et al.
(EfficientQAT, 2024) train Block-AP first, then the scales end to end; here
``qcompiler.qat.distill`` follows.

It runs in one process (the blocks one after another); a ``DistributedDataParallel`` model is
trained through its module, the same work in every process.
"""
from __future__ import annotations

import time
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from qcompiler.calibration.blockwise import capture
from qcompiler.errors import OptionError, TrainingError
from qcompiler.qat.distill import autocast_to, check_autocast, optimizer, teaching
from qcompiler.qat.linear import QATLinear
from qcompiler.qat.prepare import qat_layers, run_of


def _batches(data, batch_size: int) -> list:
    if isinstance(data, Tensor):
        if data.dim() != 2 or data.dtype not in (torch.int64, torch.int32):
            raise OptionError(f"blockwise takes token ids as an integer tensor [sequences, length], got "
                              f"{tuple(data.shape)} {data.dtype}")
        return list(data.split(batch_size))
    batches = list(data)
    if not batches:
        raise OptionError("blockwise got no data: give token ids [N, L] or a list of batches")
    return batches


def _relative_error(out: Tensor, target: Tensor) -> Tensor:
    out, target = out.float(), target.float()
    return (out - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)


def blockwise(model: nn.Module, data: Union[Tensor, Iterable], *, epochs: int = 2, batch_size: int = 4,
              lr: float = 1e-4, scale_lr: Optional[float] = None, warmup: float = 0.05,
              autocast: Optional[torch.dtype] = None, progress: bool = True, seed: int = 0, log=print) -> dict:
    """Train each block of a model ``qcompiler.qat.prepare`` made against its floating-point self.

    Args:
        data: token ids ``[N, L]`` (split into batches of ``batch_size`` rows) or a list of batches
            (model inputs); every batch is seen once per epoch, in a shuffled order, by every block.
        epochs: passes over the data per block.
        lr / scale_lr: AdamW learning rates of the weights and of the scales (default: ``lr``), with
            a linear warm-up over ``warmup`` of each block's steps and a cosine decay.
        autocast: the student's matmuls in this dtype (``torch.bfloat16``), as in ``distill``;
            targets and the inputs handed on are computed in the model's own dtype.

    Returns a record: ``blocks`` (name -> (mean loss of the first epoch, of the last)), ``steps``
    (optimizer steps, all blocks), ``seconds``. Raises ``TrainingError`` naming the block and step
    when a loss is not finite.
    """
    run = run_of(model)
    inner = getattr(model, "module", model)
    if epochs < 1 or batch_size < 1:
        raise OptionError(f"epochs and batch_size must be positive, got {epochs}, {batch_size}")
    check_autocast(autocast)
    batches = _batches(data, batch_size)
    was_training = inner.training
    inner.eval()
    start = time.perf_counter()
    with teaching(inner):
        recorded = capture(inner, batches, is_layer=lambda m: isinstance(m, QATLinear))
    if recorded.whole_model:
        raise OptionError(f"blockwise trains a model's repeated blocks (a transformer's layers) one at a time, and "
                          f"{type(inner).__name__} has none (no nn.ModuleList of blocks holding quantized linears): "
                          f"train it with qcompiler.qat.distill")
    device = next(inner.parameters()).device
    log(f"qcompile blockwise: {len(recorded.blocks)} blocks x {epochs} epoch(s) x {len(batches)} batch(es) "
        f"({run.recipe.name})")
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    x_float, x_quant = recorded.inputs, list(recorded.inputs)
    record, steps = {}, 0
    bar = tqdm(total=len(recorded.blocks), desc="qcompile blockwise", unit="block", disable=not progress)
    try:
        for (name, block), calls in zip(recorded.blocks, recorded.calls):
            with torch.no_grad(), teaching(block):
                targets = [call.replay(block, x) for x, call in zip(x_float, calls)]
            total = epochs * len(batches)
            opt, sched, _ = optimizer(qat_layers(block).values(), lr, scale_lr, total, warmup)
            if opt is not None:
                means = []
                for epoch in range(epochs):
                    losses = []
                    for j in torch.randperm(len(batches), generator=gen).tolist():
                        with autocast_to(device, autocast):
                            loss = _relative_error(calls[j].replay(block, x_quant[j]), targets[j])
                        if not torch.isfinite(loss):
                            raise TrainingError(f"the block-wise loss of {name!r} is {loss.item()} at epoch "
                                                f"{epoch + 1}: training stopped; lower lr (now {lr}) / scale_lr "
                                                f"and start again from a fresh qcompiler.qat.prepare")
                        loss.backward()
                        opt.step()
                        sched.step()
                        opt.zero_grad(set_to_none=True)
                        losses.append(loss.item())
                    means.append(sum(losses) / len(losses))
                steps += total
                record[name] = (means[0], means[-1])
                bar.set_postfix(loss=f"{means[0]:.4f}->{means[-1]:.4f}")
            with torch.no_grad():
                x_quant = [call.replay(block, x) for x, call in zip(x_quant, calls)]
            x_float = targets
            bar.update()
    finally:
        bar.close()
        inner.train(was_training)
    run.steps += steps
    seconds = time.perf_counter() - start
    log(f"qcompile blockwise: {steps} steps in {seconds / 60:.1f} min")
    return {"blocks": record, "steps": steps, "seconds": seconds}
