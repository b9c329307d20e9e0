"""KL divergence of next-token distributions, computed in row chunks that stay in cache.

``KL(teacher || student)`` over a vocabulary of tens of thousands is the largest elementwise work
of a distillation step: ``log_softmax`` of both logits, ``exp``, the difference, and the same
again backward, each a pass over ``rows x vocab`` floats. Done a few rows at a time, every
intermediate of a chunk stays in the CPU's cache, and the gradient (``softmax(student) -
softmax(teacher)``, per row) is written in the same pass, so backward is one multiply (timed
against ``log_softmax`` + ``kl_div`` by ``benchmarks/qat_settings.py``). The values are the same:
float32 per element, the sum in float64.
"""
from __future__ import annotations

import torch
from torch import Tensor

# rows per chunk: 16 rows of a 49152-token vocabulary are 3 MiB per float32 intermediate
_CHUNK_ROWS = 16


class _LogitsKL(torch.autograd.Function):
    """Mean over rows of ``KL(softmax(reference) || softmax(logits))``; gradient to ``logits`` only."""

    @staticmethod
    def forward(ctx, logits: Tensor, reference: Tensor) -> Tensor:
        vocab = logits.shape[-1]
        q, ref = logits.detach().reshape(-1, vocab), reference.detach().reshape(-1, vocab)
        rows = q.shape[0]
        grad = torch.empty((rows, vocab), dtype=torch.float32, device=q.device)
        total = torch.zeros((), dtype=torch.float64, device=q.device)
        for i in range(0, rows, _CHUNK_ROWS):
            lq = torch.log_softmax(q[i:i + _CHUNK_ROWS].float(), -1)
            lr = torch.log_softmax(ref[i:i + _CHUNK_ROWS].float(), -1)
            pr = lr.exp()
            total += (pr * (lr - lq)).sum(dtype=torch.float64)
            torch.sub(lq.exp_(), pr, out=grad[i:i + _CHUNK_ROWS])
        ctx.save_for_backward(grad)
        ctx.rows, ctx.shape, ctx.dtype = rows, logits.shape, logits.dtype
        return (total / max(1, rows)).to(torch.float32)

    @staticmethod
    def backward(ctx, g: Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * (g / max(1, ctx.rows))).reshape(ctx.shape).to(ctx.dtype), None


def logits_kl(logits: Tensor, reference: Tensor) -> Tensor:
    """``KL(softmax(reference) || softmax(logits))`` over the last dimension, averaged over every
    other position (``kl_div(..., reduction="batchmean")`` of the flattened rows), as a float32 0-d
    tensor; differentiable in ``logits``."""
    if logits.shape != reference.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and reference {tuple(reference.shape)} differ in shape")
    return _LogitsKL.apply(logits, reference)
