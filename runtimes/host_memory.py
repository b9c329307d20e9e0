"""Hands the heap memory a compile freed back to the operating system.

Quantizing a model's weights and exporting its graph allocate and free many weight-sized
temporaries. glibc's allocator keeps freed memory in its arenas for reuse, so a process that
compiled a model stays well above what it holds (docs/experiments.md, "Memory: what a compile
left behind"). ``return_freed_memory`` asks the allocator to give it back
(``malloc_trim``); where the C library has no such call (macOS, Windows, musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import gc
import sys


def _malloc_trim():
    """glibc's ``malloc_trim`` among the symbols the process has loaded, or None where the C
    library has none."""
    if not sys.platform.startswith("linux"):
        return None
    return getattr(ctypes.CDLL(None), "malloc_trim", None)


def return_freed_memory(collect: bool = False) -> bool:
    """Give the heap's free memory back to the operating system; True where it could be asked.
    ``collect`` runs Python's cycle collector first: an exported graph (the exporter's FX graphs,
    the ONNX IR with its copies of the weights) is a web of reference cycles, which only the
    collector frees."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
