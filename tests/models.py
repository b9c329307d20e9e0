"""Small models for tests: the graph shapes the passes must handle."""
import torch
import torch.nn.functional as F
from torch import nn

from qcompiler.ir import int4, ops

qops = torch.ops.qcompile


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Block(nn.Module):
    """Llama-like: norm -> q/k/v (a group, foldable); norm -> gate/up (foldable); down (not)."""

    def __init__(self, d=48, h=80, norm="rms"):
        super().__init__()
        self.norm1 = RMSNorm(d) if norm == "rms" else nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d // 2), nn.Linear(d, d // 2)
        self.o = nn.Linear(d, d)
        self.norm2 = RMSNorm(d) if norm == "rms" else nn.LayerNorm(d)
        self.gate, self.up = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d)
        self.eval()  # an inference model, as from_pretrained returns one (training mode runs in float)

    def forward(self, x):
        y = self.norm1(x)
        q, k, v = self.q(y), self.k(y), self.v(y)
        a = q * torch.cat([k, v], -1).sigmoid()
        x = x + self.o(a)
        y = self.norm2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class Stack(nn.Module):
    def __init__(self, n=2, d=48, h=80, norm="rms", head=24):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, h, norm) for _ in range(n))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, head, bias=False)
        self.eval()  # an inference model, as from_pretrained returns one (training mode runs in float)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.norm(x))


def with_outlier_channels(x, channels=(3, 11), factor=40.0):
    """Activations like an LLM's: a few input channels far larger than the rest."""
    x = x.clone()
    x[..., list(channels)] *= factor
    return x


class Capture:
    """A backend that records what Dynamo hands over and runs the graph unchanged."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append((gm, list(example_inputs)))
        return gm.forward


def capture(model, *args):
    cap = Capture()
    torch._dynamo.reset()
    torch.compile(model, backend=cap)(*args)
    assert len(cap.graphs) == 1, "expected a single graph"
    return cap.graphs[0]


class QOp(nn.Module):
    """One linear q-op on stored quantized weights, its activation quantized as ``act`` says."""

    def __init__(self, kind, n, k, qdtype=torch.int8, group=32, symmetric=True, smooth=False, bias=True):
        super().__init__()
        w = torch.randn(n, k)
        self.kind, self.qdtype, self.group = kind, qdtype, group
        self.bias = torch.randn(n) if bias else None
        self.inv = (torch.rand(k) + 0.5) if smooth else None
        if kind == "w4a16":
            p = int4.quantize(w, group, symmetric)
            self.w4, self.s4, self.z4 = p.packed, p.scale, p.zero
        else:
            self.wq, self.ws = ops.quantize_per_channel_ref(w, qdtype)
        amax = torch.tensor(3.0)
        self.xs = ops.scale_from_amax(amax, qdtype)

    def forward(self, x):
        if self.kind == "dynamic":
            xq, sx = qops.quantize_per_token(x, self.inv, self.qdtype)
            return qops.linear_w8a8(xq, sx, self.wq, self.ws, self.bias, torch.float32)
        if self.kind == "static":
            xq = qops.quantize_per_tensor(x, self.xs, self.inv, self.qdtype)
            return qops.linear_w8a8(xq, self.xs, self.wq, self.ws, self.bias, torch.float32)
        if self.kind == "blocks":
            return qops.linear_w8a8_blocks(x, self.inv, self.wq, self.ws, self.bias, self.group, torch.float32)
        if self.kind == "w8a16":
            return qops.linear_w8a16(x, self.wq, self.ws, self.bias)
        return qops.linear_w4a16(x, self.w4, self.s4, self.z4, self.inv, self.group, self.bias)
