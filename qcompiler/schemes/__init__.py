"""Quantization schemes: one file per kind of quantized linear, found by ``SchemeKey`` in ``SCHEMES``.

A new scheme is a ``Scheme`` subclass in a file of its own, one line in ``registry.BUILT_IN`` (or a
``register_scheme`` call), and its q-op's kernels; recipes whose formats give its key use it.
"""
