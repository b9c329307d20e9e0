"""Kernel choice by measurement: for one q-op call shape, the fastest kernel that computes it right.

A q-op that has several GPU implementations (torch built-ins such as tinygemm and ``_scaled_mm``,
qcompile's Triton kernels, a dequantize-then-cuBLAS path) is a ``Family``: its ``Kernel`` table,
each kernel saying whether it can run a call and why not. ``Chooser.choose`` takes a call's real
weights and a row count M, draws a fresh random activation of M rows, runs every kernel that can
run against the q-op's reference (a wrong or NaN result removes the kernel, with the error as the
reason), times the rest with ``timer`` and keeps the fastest. It also times the floating-point
linear of the same shape, so a choice reports its speed against bf16 (``Choice.speedup``).

Measurements are kept on disk (``$QCOMPILE_CACHE/kernels``) keyed by the GPU, the versions of
torch and triton, the source of the kernels and the call's shape, so a second process re-times
nothing; on a cache hit only the kept kernel's result is checked on the call's weights (a failure
re-measures the rest). Where nothing can be timed (the CPU interpreter, no timer), the first
kernel of the table that can run is taken unchecked (the kernel tests check every kernel), and the
choice says it was not measured. The Chooser is an object the lowering makes per build: no state outlives it but the
disk cache.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from torch import Tensor

from qcompiler.runtimes.disk_cache import cache_folder, code_version

# a kernel's result against the reference on the same operands: 16-bit activations round inputs,
# weights and outputs (a few 1e-3); beyond this the kernel is computing something else
MAX_REL_ERR = 2e-2
META_KEY = "qcompile_kernels"  # node.meta of a planned q-op: its Choice per M bucket (explain reads it)
RUNS_KEY = "qcompile_runs"  # node.meta of a planned q-op that runs other than its choice's kernel: what, and why


@dataclass(frozen=True)
class Kernel:
    """One implementation of a q-op. ``run(args, prepared)`` computes the q-op on its arguments
    (schema order); ``prepare(args)`` (optional) builds, once per weight, the tensors ``run`` reads
    besides them (a re-packed weight); ``can_run(args, m)`` -> (ok, reason)."""

    name: str
    run: Callable
    can_run: Callable = lambda args, m: (True, "")
    prepare: Optional[Callable] = None


@dataclass(frozen=True)
class Family:
    """The kernels of one q-op, in the order taken when nothing can be measured, and how to make
    a call of M rows from a call's arguments."""

    op: str
    kernels: tuple
    reference: Callable            # q-op reference: (*args) -> Tensor
    with_rows: Callable            # (args, m) -> args whose activation is fresh random data of m rows
    shape: Callable                # args -> a tuple naming everything but M that the speed depends on
    baseline: Callable             # (args, m) -> a zero-argument function running the float linear
    baseline_name: str = "the float linear"  # what ``baseline`` runs, as ``explain`` names it
    where: Callable = lambda args, m: f"M={m}"  # (args, m) -> the measured call's sizes, as explain names them

    def kernel(self, name: str) -> Kernel:
        return next(k for k in self.kernels if k.name == name)

    def index(self, name: str) -> int:
        return [k.name for k in self.kernels].index(name)


@dataclass(frozen=True)
class Choice:
    """What ``choose`` kept for one (family, shape, M), with what it measured (microseconds)."""

    op: str
    m: int
    kernel: str
    times_us: dict = field(default_factory=dict)      # kernel -> time, for every kernel timed
    rejected: dict = field(default_factory=dict)      # kernel -> why it did not run
    baseline_us: Optional[float] = None               # the float linear of the same shape
    measured: bool = True
    cached: bool = False
    baseline_name: str = "the float linear"
    where: str = ""                                   # the call's sizes ("M=<m>" when empty)

    @property
    def speedup(self) -> Optional[float]:
        """The float linear's time over the kept kernel's (> 1: faster than floating point)."""
        t = self.times_us.get(self.kernel)
        return None if not t or self.baseline_us is None else self.baseline_us / t

    def describe(self) -> str:
        where = self.where or f"M={self.m}"
        if not self.measured:
            return f"{self.kernel} ({where}; not measured here)"
        s = self.speedup
        return f"{self.kernel} ({where}: {self.times_us[self.kernel]:.1f} us" + (
            f", {s:.2f}x {self.baseline_name})" if s else ")")


def rel_err(out: Tensor, ref: Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.nan
    denom = ref.norm().item()
    return (out - ref).norm().item() / denom if denom else (out - ref).norm().item()


def cuda_timer(fn: Callable) -> float:
    """Median microseconds of ``fn`` on the current CUDA device, replayed from a CUDA graph when it
    can be captured (the launch overhead a compiled model with cuda_graphs=True does not see)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except Exception:  # not capturable (a host sync inside): time the calls themselves
        torch.cuda.synchronize()
        run = fn
    return 1e3 * triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median")


def _versions() -> str:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    return f"torch {torch.__version__} triton {tv}"


class Chooser:
    """Measures kernels (``timer``: fn -> microseconds, None = do not measure) and keeps the
    results on disk under ``cache_dir`` (None: no disk cache). ``code_files`` key the cache."""

    def __init__(self, timer: Optional[Callable] = None, cache_dir=None, code_files=(), device_name: str = ""):
        self.timer = timer
        self.cache_dir = cache_dir
        self.device_name = device_name
        self.code_key = code_version(*code_files)[:16] if code_files else ""
        self.choices: dict = {}

    @classmethod
    def for_device(cls, device: torch.device, code_files=()) -> "Chooser":
        """The chooser a build uses: CUDA events and the disk cache on a GPU; no timing elsewhere."""
        if device.type == "cuda":
            return cls(cuda_timer, cache_folder("kernels"), code_files, torch.cuda.get_device_name(device))
        return cls(None, None, code_files, device.type)

    def _key(self, family: Family, args, m: int) -> str:
        return json.dumps([self.device_name, _versions(), self.code_key, family.op, m,
                           [str(v) for v in family.shape(args)]])

    def _cache_file(self, key: str):
        import hashlib

        return None if self.cache_dir is None else self.cache_dir / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")

    def _load(self, key: str) -> Optional[Choice]:
        path = self._cache_file(key)
        try:
            data = json.loads(path.read_text()) if path is not None and path.exists() else None
        except (OSError, ValueError):
            return None  # unreadable: measure again
        return None if not data or data.get("key") != key else Choice(**data["choice"])

    def _store(self, key: str, choice: Choice) -> None:
        path = self._cache_file(key)
        if path is not None:
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes racing write whole files
            tmp.write_text(json.dumps({"key": key, "choice": {**choice.__dict__, "cached": False}}))
            tmp.replace(path)

    def check(self, family: Family, kernel: Kernel, args, m: int, prepared=None) -> tuple:
        """``(ok, reason)``: the kernel's result on a fresh M-row call against the reference."""
        call = family.with_rows(args, m)
        try:
            if prepared is None and kernel.prepare is not None:
                prepared = kernel.prepare(call)
            out = kernel.run(call, prepared or ())
        except Exception as exc:  # a kernel that fails to build or launch is not a choice
            return False, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        err = rel_err(out, family.reference(*call))
        if not err <= MAX_REL_ERR:
            return False, f"relative error {err:.2e} against the q-op reference (limit {MAX_REL_ERR:.0e})"
        return True, ""

    def choose(self, family: Family, args, m: int) -> Choice:
        """The kernel to run ``family``'s q-op on ``args`` at M rows (module docstring)."""
        key = self._key(family, args, m)
        if key in self.choices:
            return self.choices[key]
        rejected, runnable = {}, []
        for kernel in family.kernels:
            ok, why = kernel.can_run(args, m)
            if ok:
                runnable.append(kernel)
            else:
                rejected[kernel.name] = why
        if not runnable:
            raise ValueError(f"{family.op}: no kernel can run M={m}: {rejected}")
        cached = self._load(key) if self.timer is not None else None
        if cached is not None and cached.kernel in [k.name for k in runnable]:
            ok, why = self.check(family, family.kernel(cached.kernel), args, m)
            if ok:
                choice = replace(cached, cached=True)
                self.choices[key] = choice
                return choice
        if self.timer is None:  # nothing to measure with (the CPU interpreter): the table's order
            choice = Choice(family.op, m, runnable[0].name, rejected=rejected, measured=False,
                            baseline_name=family.baseline_name, where=family.where(args, m))
            self.choices[key] = choice
            return choice
        times = {}
        for kernel in runnable:
            call = family.with_rows(args, m)
            try:
                prepared = kernel.prepare(call) if kernel.prepare is not None else ()
            except Exception as exc:  # a layout the built-in refuses: not a choice, said why
                rejected[kernel.name] = f"prepare failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                continue
            ok, why = self.check(family, kernel, call, m, prepared)
            if not ok:
                rejected[kernel.name] = why
                continue
            times[kernel.name] = self.timer(lambda: kernel.run(call, prepared))
        if not times:
            raise ValueError(f"{family.op}: every kernel failed its check at M={m}: {rejected}")
        baseline = self.timer(family.baseline(args, m))
        best = min(times, key=times.get)
        choice = Choice(family.op, m, best, times, rejected, baseline, baseline_name=family.baseline_name,
                        where=family.where(args, m))
        self._store(key, choice)
        self.choices[key] = choice
        return choice
