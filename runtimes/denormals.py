"""Denormal floats flushed to zero on the thread that runs an ONNX Runtime session, for the run only.

A float32 below 1.2e-38 (a denormal: a softmax weight of a far-off key, an activation's
far tail) takes the CPU's slow path, tens of times slower per operation. Flushing them to zero
changes a result by less than 1.2e-38 and made MiniLM 8x128's ``ort`` sessions 1.14-1.28x
and SmolLM2's prefill 1.10-1.14x faster, with the same outputs bit for bit
(docs/results/ort_session_settings_xeon_amx.md).

ONNX Runtime's ``session.set_denormal_as_zero`` (``runtimes.ort_session``) flushes on the
session's own worker threads. The thread that calls ``run`` computes too, and ONNX Runtime sets
that thread's mode only once per process, for good, on whichever thread makes the first such
session: ``flushing()`` sets it for the extent of a run (or of making a session) and puts back
the mode the thread had, so the user's own code on that thread never sees the change.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

_TINY = np.float32(np.finfo(np.float32).tiny)  # the smallest normal float32
_TWO = np.float32(2.0)
_DENORMAL = np.frombuffer(np.uint32(1).tobytes(), dtype=np.float32)[0]  # the smallest denormal, by its bits


def mode() -> tuple:
    """(flush to zero, denormals are zero) of this thread, read from what its arithmetic does:
    a result below the normal range becomes zero; a denormal operand compares as zero."""
    return bool(_TINY / _TWO == 0), not bool(_DENORMAL > 0)


def _set(flush: bool) -> bool:
    return torch.set_flush_denormal(flush)  # both modes at once; False where the CPU has neither


@contextlib.contextmanager
def flushing():
    """Flush denormals on this thread inside the block; afterwards the thread has the mode it had.
    A thread with one of the two modes set by hand (which torch cannot set alone) is left as it is."""
    before = mode()
    changed = before == (False, False) and _set(True)
    try:
        yield
    finally:
        if changed or mode() != before:
            _restore(before)


def _restore(before: tuple) -> None:
    if before[0] == before[1]:
        _set(before[0])
