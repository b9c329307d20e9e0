"""Cold compile caches for a benchmark's first-call timings, keeping the converted model copies.

A first call's time depends on what the caches hold: qcompile's exported ONNX files
(``$QCOMPILE_CACHE/onnx``) and Inductor's compiled kernels (``$TORCHINDUCTOR_CACHE_DIR``).
``cold_cache_env`` gives the environment of a run that finds both empty, with the bundled
models' converted copies (not a compile artifact) linked in, so nothing is converted again.
"""
from __future__ import annotations

import os

COMPILED = ("onnx", "kernels", "engines")  # the cache's compile artifacts (``runtimes.disk_cache.cache_folder``)


def cold_cache_env(root: str, name: str) -> dict:
    """``{"QCOMPILE_CACHE": ..., "TORCHINDUCTOR_CACHE_DIR": ...}``: empty folders under ``root``
    named for ``name``, the qcompile one holding links to the converted model copies."""
    from qcompiler.bundled import zoo

    slug = "".join(c if c.isalnum() else "_" for c in name)
    qcompile_cache = os.path.join(root, "qcompile_" + slug)
    os.makedirs(qcompile_cache, exist_ok=True)
    for src in zoo.cache_dir().iterdir():
        dst = os.path.join(qcompile_cache, src.name)
        if src.name not in COMPILED and not os.path.lexists(dst):
            os.symlink(src, dst)
    return {"QCOMPILE_CACHE": qcompile_cache, "TORCHINDUCTOR_CACHE_DIR": os.path.join(root, "inductor_" + slug)}
