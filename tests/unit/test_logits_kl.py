"""The chunked KL of next-token distributions against ``kl_div`` of ``log_softmax`` in float64:
value and gradient, over row counts that do and do not fill a chunk, and NaN propagation."""
import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from qcompiler.algorithms.logits_kl import logits_kl


def _reference(logits, reference):
    vocab = logits.shape[-1]
    return F.kl_div(torch.log_softmax(logits.double(), -1).reshape(-1, vocab),
                    torch.log_softmax(reference.double(), -1).reshape(-1, vocab), log_target=True, reduction="batchmean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7), (3, 37, 50), (2, 16, 129), (33, 1000)])
def test_value_and_gradient_match_float64(shape, dtype):
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    logits = (3 * torch.randn(shape, generator=gen)).to(dtype).requires_grad_(True)
    reference = logits.detach().float() + torch.randn(shape, generator=gen)
    got = logits_kl(logits, reference.to(dtype))
    assert got.dtype == torch.float32 and got.dim() == 0
    want_logits = logits.detach().double().requires_grad_(True)
    want = _reference(want_logits, reference.to(dtype))
    want.backward()
    got.backward()
    assert abs(got.item() - want.item()) <= 1e-5 * max(1.0, want.item())
    assert logits.grad.dtype == dtype and logits.grad.shape == logits.shape
    assert rel_err(logits.grad.double(), want_logits.grad) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_zero_at_the_reference_and_nan_propagates():
    ref = torch.randn(40, 19)
    assert logits_kl(ref, ref).abs().item() < 1e-6
    bad = ref.clone()
    bad[21, 3] = float("nan")
    assert torch.isnan(logits_kl(bad, ref)) and torch.isnan(logits_kl(ref, bad))


def test_shapes_must_agree():
    with pytest.raises(ValueError, match=r"logits \(2, 5\) and reference \(2, 6\) differ in shape"):
        logits_kl(torch.zeros(2, 5), torch.zeros(2, 6))
