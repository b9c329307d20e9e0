"""Folders for compiled artifacts kept across processes (TensorRT engines, exported ONNX files) and
the code version that keys them.

``$QCOMPILE_CACHE/<kind>``, else ``~/.cache/qcompile/<kind>``. Everything kept there is rebuilt
when missing or unreadable, so a folder may be deleted at any time; ``keep`` bounds a folder's
size, dropping the files used longest ago first.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import stat
import sys
import types

import torch

import qcompiler


def cache_folder(kind: str) -> pathlib.Path:
    """The folder for artifacts of ``kind`` (created)."""
    root = os.environ.get("QCOMPILE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qcompile")
    path = pathlib.Path(root) / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def code_version(*files: str) -> str:
    """A digest of qcompile's and torch's versions and the source of ``files``: what an artifact
    built by that code depends on besides its inputs (a change to any of them is a new key)."""
    digest = hashlib.sha256(f"{qcompiler.__version__} {torch.__version__}".encode())
    for f in sorted(files):
        digest.update(pathlib.Path(f).read_bytes())
    return digest.hexdigest()


def source_files(*modules) -> list:
    """The source files of ``modules`` and of every qcompiler module they read, directly or
    through others (a module global that is a qcompiler module, or a function or class defined
    in one): all the code an artifact built by ``modules`` may depend on."""
    seen, todo = {}, list(modules)
    while todo:
        module = todo.pop()
        if module.__name__ in seen or not module.__name__.startswith("qcompiler"):
            continue
        seen[module.__name__] = module.__file__
        for value in vars(module).values():
            owner = value if isinstance(value, types.ModuleType) else sys.modules.get(getattr(value, "__module__", None) or "")
            if owner is not None and owner.__name__.startswith("qcompiler") and owner.__name__ not in seen:
                todo.append(owner)
    return sorted(seen.values())


def touch(path: pathlib.Path) -> None:
    """Mark a kept file as just used (``keep`` drops the least recently used first)."""
    try:
        os.utime(path)
    except OSError:
        pass


def keep(folder: pathlib.Path, max_bytes: int) -> None:
    """Delete the least recently used files of ``folder`` until it holds at most ``max_bytes``
    (folders in it, such as another process's files being written, are left alone)."""
    files = []
    for f in folder.iterdir():
        try:
            st = f.stat()
        except OSError:  # another process removed it
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        files.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in files)
    for _, size, f in sorted(files, key=lambda t: t[0]):
        if total <= max_bytes:
            break
        f.unlink(missing_ok=True)
        total -= size
