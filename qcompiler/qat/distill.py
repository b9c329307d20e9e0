"""``qcompiler.qat.distill``: a ready training loop for a prepared model, taught by its own float self.

The teacher is the model with its fake quantization switched off (``QATLinear.teaching``): every
other parameter is frozen by ``prepare``, so that is exactly the floating-point model, with no
second copy of it (only the float weights of layers whose trained weight started elsewhere,
AWQ / GPTQ codes, are kept). The loss is KL(teacher || student) on the next-token distributions
(``logits``; a model without them is matched on its output by relative squared error), plus
``task_weight`` times the language-model loss when the data are token ids. AdamW with a linear
warm-up and a cosine decay, gradient accumulation, optional gradient checkpointing, a progress bar
with the loss. ``data=None`` is data-free: sequences sampled from the teacher (LLM-QAT).

Under ``torch.distributed`` (a ``DistributedDataParallel`` model), each process takes its share
of every global batch (rows ``rank::world``), so N processes compute what one process computes on
the same global batch.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcompiler.algorithms.scale_tuning import judged_output, output_loss
from qcompiler.calibration.recorder import call_model
from qcompiler.errors import OptionError, TrainingError
from qcompiler.qat.prepare import qat_layers, run_of


@contextlib.contextmanager
def teaching(model: nn.Module):
    """The prepared model as the floating-point teacher for the duration (fake quantization off)."""
    layers = list(qat_layers(model).values())
    for q in layers:
        q.teaching = True
    try:
        yield
    finally:
        for q in layers:
            q.teaching = False


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _share() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _device(model: nn.Module) -> torch.device:
    return next(_inner(model).parameters()).device


class _Batches:
    """Global batches, the same sequence in every process: random rows of a token-id tensor
    ``[N, L]``, or the given batches in turn."""

    def __init__(self, data, batch_size: int, seed: int):
        self.data, self.batch_size = data, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.i = 0
        if isinstance(data, Tensor):
            if data.dim() != 2 or data.dtype not in (torch.int64, torch.int32):
                raise OptionError(f"distill takes token ids as an integer tensor [sequences, length], got "
                                  f"{tuple(data.shape)} {data.dtype}")
        elif not data:
            raise OptionError("distill got no data: give token ids [N, L], a list of batches, or data=None "
                              "(sequences sampled from the teacher)")

    def next(self):
        if isinstance(self.data, Tensor):
            rows = torch.randint(self.data.shape[0], (self.batch_size,), generator=self.gen)
            return self.data[rows]
        batch = self.data[self.i % len(self.data)]
        self.i += 1
        return batch


def _rows(batch, rank: int, world: int, device):
    """This process's share of a global batch (rows ``rank::world``), on ``device``."""
    def take(t):
        return t[rank::world].to(device) if isinstance(t, Tensor) and t.dim() > 0 else t
    if isinstance(batch, dict):
        return {k: take(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(take(t) for t in batch)
    return take(batch)


def _token_ids(batch) -> Optional[Tensor]:
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch
    return ids if isinstance(ids, Tensor) and ids.dtype in (torch.int64, torch.int32) else None


def autocast_to(device: torch.device, dtype: Optional[torch.dtype]):
    """Matmuls in ``dtype`` for the duration (``torch.autocast``), or nothing for None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _loss(model, batch, task_weight: float, dtype: Optional[torch.dtype] = None) -> Tensor:
    device = _device(model)
    with torch.no_grad(), teaching(_inner(model)), autocast_to(device, dtype):
        ref, is_logits = judged_output(call_model(_inner(model), batch))
    with autocast_to(device, dtype):
        out, _ = judged_output(call_model(model, batch))
    loss = output_loss(out, ref, is_logits)
    ids = _token_ids(batch)
    if task_weight and is_logits and ids is not None:
        loss = loss + task_weight * F.cross_entropy(out[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return loss


def teacher_samples(model: nn.Module, count: int, length: int, *, batch_size: int = 8, seed: int = 0) -> Tensor:
    """``count`` token sequences of ``length`` sampled from the teacher (the first token uniform over
    the vocabulary, the rest drawn from the teacher's distribution): distill's data when none is given."""
    inner = _inner(model)
    vocab = getattr(getattr(inner, "config", None), "vocab_size", None)
    if not hasattr(inner, "generate") or vocab is None:
        raise OptionError("data=None samples training sequences from the model itself, which needs a transformers "
                          "model with generate(); give data (token ids [N, L] or a list of batches) instead")
    out = []
    with torch.random.fork_rng(devices=[]), torch.no_grad(), teaching(inner):
        torch.manual_seed(seed)
        for start in range(0, count, batch_size):
            first = torch.randint(vocab, (min(batch_size, count - start), 1)).to(_device(inner))
            seq = inner.generate(first, attention_mask=torch.ones_like(first), do_sample=True, top_k=0,
                                 max_new_tokens=length - 1, min_new_tokens=length - 1, pad_token_id=0)
            out.append(seq[:, :length].cpu())
    return torch.cat(out)


def _schedule(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def check_autocast(autocast: Optional[torch.dtype]) -> None:
    if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
        raise OptionError(f"autocast={autocast!r}: give torch.bfloat16, torch.float16 or None (no autocast)")


def optimizer(layers, lr: float, scale_lr: Optional[float], steps: int, warmup: float):
    """(AdamW over the trainable weights (``lr``) and scales (``scale_lr``, default ``lr``) of the
    ``QATLinear`` layers, its warm-up-then-cosine schedule over ``steps``, the parameters)."""
    weights = [q.weight for q in layers if q.weight.requires_grad]
    scales = [p for q in layers for p in (q.weight_scale, q.input_scale) if p is not None and p.requires_grad]
    groups = [g for g in ({"params": weights, "lr": lr}, {"params": scales, "lr": scale_lr or lr}) if g["params"]]
    if not groups:
        return None, None, (weights, scales)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    warm = max(1, int(round(warmup * steps)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _schedule(i, steps, warm)), (weights, scales)


def distill(model: nn.Module, data: Union[Tensor, Iterable, None] = None, *, steps: int = 100, batch_size: int = 4,
            accumulate: int = 1, lr: float = 1e-5, scale_lr: Optional[float] = None, warmup: float = 0.05,
            task_weight: float = 0.0, checkpointing: bool = False, autocast: Optional[torch.dtype] = None,
            samples: int = 64, sample_length: int = 256, progress: bool = True, seed: int = 0, log=print) -> dict:
    """Train a model ``qcompiler.qat.prepare`` made, against its own floating-point self.

    Args:
        model: the prepared model, or ``DistributedDataParallel`` of it.
        data: token ids ``[N, L]`` (random rows drawn each step), a list of batches (tensors, tuples
            or dicts of model inputs; taken in turn, each one global batch), or None: ``samples``
            sequences of ``sample_length`` tokens sampled from the teacher first.
        steps: optimizer steps; each takes ``accumulate`` global batches of ``batch_size`` rows.
        lr / scale_lr: AdamW learning rates of the weights and of the scales (default: ``lr``).
        warmup: the fraction of steps over which the learning rate rises linearly; cosine decay after.
        task_weight: weight of the language-model loss added to the distillation loss (token-id data).
        checkpointing: transformers' gradient checkpointing (less memory, about a third more time;
            the model then runs in training mode, dropout included, which it otherwise does not).
        autocast: run the teacher's and the student's matmuls in this dtype (``torch.bfloat16``:
            ``torch.autocast``), faster on CPUs with AVX-512 BF16 or AMX and on GPUs. The fake quantization, the weights, the scales, the optimizer and the loss stay
            float32; None (default) runs everything in the model's own dtype.

    Returns a record: ``losses`` (one per step), ``seconds`` (every step, the first micro-batch's
    one-time set-up included), ``tokens``. Raises ``TrainingError`` naming the step when the loss
    is not finite.
    """
    run = run_of(model)
    inner = _inner(model)
    layers = qat_layers(inner)
    outside = sorted(n for n, p in inner.named_parameters() if p.requires_grad and not any(
        n.startswith(name + ".") for name in layers))
    if outside:
        raise OptionError(f"parameters outside the quantized linears are trainable ({', '.join(outside[:3])}"
                          f"{', ...' if len(outside) > 3 else ''}): the teacher is the model's own float weights, so "
                          f"they must stay frozen (requires_grad_(False)); use your own loop to train them")
    if steps < 1 or batch_size < 1 or accumulate < 1:
        raise OptionError(f"steps, batch_size and accumulate must be positive, got {steps}, {batch_size}, {accumulate}")
    check_autocast(autocast)
    rank, world = _share()
    if batch_size % world:
        raise OptionError(f"batch_size={batch_size} does not split over {world} processes: use a multiple of {world}")
    if checkpointing:
        if not hasattr(inner, "gradient_checkpointing_enable"):
            raise OptionError("checkpointing=True uses transformers' gradient_checkpointing_enable(), which this "
                              "model lacks; set checkpointing=False")
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if data is None:
        t = time.perf_counter()
        if rank == 0:
            log(f"qcompile distill: sampling {samples} sequences of {sample_length} tokens from the teacher (no data given)")
        data = teacher_samples(inner, samples, sample_length, seed=seed)
        if rank == 0:
            log(f"qcompile distill: sampled in {time.perf_counter() - t:.0f} s")
    batches = _Batches(data, batch_size, seed)
    opt, sched, (weights, scales) = optimizer(layers.values(), lr, scale_lr, steps, warmup)
    if opt is None:
        raise OptionError("nothing in this model is trainable: every quantized linear's weight and scales are "
                          "frozen (requires_grad False); prepare again, or unfreeze what should train")
    device = _device(model)
    was_training = inner.training
    # eval mode (no dropout: student and teacher see the same network), except under transformers'
    # gradient checkpointing, which acts in training mode only
    model.train(checkpointing)

    def micro_batch(batch, step: int) -> float:
        """Forward and backward of one micro-batch (its gradient accumulated); its loss."""
        loss = _loss(model, _rows(batch, rank, world, device), task_weight, autocast)
        if not torch.isfinite(loss):
            raise TrainingError(f"the distillation loss is {loss.item()} at step {step + 1} of {steps}: "
                                f"training stopped; lower lr (now {lr}) / scale_lr and start again from "
                                f"a fresh qcompiler.qat.prepare")
        (loss / accumulate).backward()
        return loss.item() / accumulate

    from tqdm.auto import tqdm

    losses, bar = [], None
    try:
        # the first micro-batch is timed to say how long the run takes (its gradient counts in step 1)
        start = time.perf_counter()
        first_batch = batches.next()
        first_loss = micro_batch(first_batch, 0)
        per_batch = time.perf_counter() - start
        tokens = _token_ids(first_batch)
        tokens_per_batch = tokens.numel() if tokens is not None else None
        if rank == 0:
            trained = sum(p.numel() for p in weights) + sum(p.numel() for p in scales)
            log(f"qcompile distill: {len(layers)} quantized linears ({run.recipe.name}), {trained / 1e6:.1f}M "
                f"trainable values ({'weights and scales' if weights else 'scales only'}); {steps} steps x "
                f"{accumulate} batch(es) of {batch_size}{f' ({tokens_per_batch} tokens)' if tokens_per_batch else ''}"
                f"{f' over {world} processes' if world > 1 else ''}; at most about "
                f"{per_batch * steps * accumulate / 60:.1f} min (timed on the first batch, which also pays one-time "
                f"set-up)")
        bar = tqdm(total=steps, desc="qcompile distill", unit="step", disable=not progress or rank != 0)
        for step in range(steps):
            total = first_loss if step == 0 else 0.0
            for _ in range(accumulate - 1 if step == 0 else accumulate):
                total += micro_batch(batches.next(), step)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            run.steps += 1
            losses.append(total)
            bar.set_postfix(loss=f"{total:.4f}")
            bar.update()
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
        if checkpointing:
            inner.gradient_checkpointing_disable()
    seconds = time.perf_counter() - start
    if rank == 0:
        log(f"qcompile distill: {steps} steps in {seconds / 60:.1f} min; loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return {"losses": losses, "seconds": seconds,
            "tokens": None if tokens_per_batch is None else tokens_per_batch * accumulate * steps}
