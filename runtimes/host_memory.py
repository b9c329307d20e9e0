"""Hands the heap memory a compile freed back to the operating system.

Quantizing a model's weights and exporting its graph allocate and free many weight-sized
temporaries. glibc's allocator keeps freed memory in its arenas for reuse, so a process that
compiled a model stays well above what it holds (docs/experiments.md, "Memory: what a compile
left behind"). ``return_freed_memory`` asks the allocator to give it back
(``malloc_trim``); where the C library has no such call (macOS, Windows, musl) it does nothing.
``FilePages`` lets the kernel reclaim the pages of mapped weights a compile replaced.
"""
from __future__ import annotations

import ctypes
import gc
import os
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


MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now (a file's are read again when touched)


def _file_mappings() -> list:
    """(start, end) of every mapping of a file in this process (``/proc/self/maps`` lines with an
    inode); empty where the file does not exist (not Linux)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[4] != "0":
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    return spans


class FilePages:
    """The process's file mappings, read once (``/proc/self/maps``), to release the pages of many
    tensors one by one as they stop being read (``release``) without reading them again each time.
    A mapping made after this object is not seen: make another for it."""

    def __init__(self):
        linux = sys.platform.startswith("linux")
        self.spans = _file_mappings() if linux else []
        self.madvise = getattr(ctypes.CDLL(None, use_errno=True), "madvise", None) if self.spans else None
        if self.madvise is not None:
            self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.page = os.sysconf("SC_PAGE_SIZE") if linux else 0

    def release(self, tensors) -> int:
        """Drop the resident pages of CPU tensors that are views of a mapped file (a checkpoint
        loaded with ``mmap``, as transformers loads safetensors) and that nothing reads any more,
        such as the floating-point weights a compile replaced by their quantized copies. The kernel
        reclaims them (``madvise(MADV_PAGEOUT)``) and reads them from the file again if they are
        touched, so no value changes and nothing breaks; a page the process has written is
        anonymous memory and stays. Returns how many bytes were asked for (0 where the system has
        no such call)."""
        if self.madvise is None:
            return 0
        page, asked = self.page, 0
        for t in tensors:
            if t.device.type != "cpu" or t.numel() == 0:
                continue
            lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
            if not any(s <= lo and hi <= e for s, e in self.spans):
                continue
            lo, hi = -(-lo // page) * page, hi // page * page  # whole pages only: a neighbour's stay
            if hi > lo and self.madvise(lo, hi - lo, MADV_PAGEOUT) == 0:
                asked += hi - lo
        return asked

