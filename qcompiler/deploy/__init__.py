"""Deployment artifacts: ``export_onnx`` (a quantized model as one ONNX file, TensorRT or ORT form)
and ``onnx_check`` (TensorRT's explicit-quantization rules, checked on any ONNX file)."""
