"""Deployment artifacts: ``export_onnx`` (a quantized model as one ONNX file, TensorRT or ORT form),
``onnx_check`` (TensorRT's explicit-quantization rules, checked on any ONNX file) and
``artifacts`` (a model's quantization state saved and loaded: calibrate once, compile anywhere)."""
