"""Runtimes: what executes a lowered graph outside plain torch.

Triton kernels (GPU) and the ONNX Runtime / TensorRT session wrappers live here; the
``reference`` and ``inductor`` targets need nothing from this package.
"""
