"""The q-op IR: the quantized operators passes emit and lowerings consume (``ops``), and the
packed INT4 weight layout they all share (``int4``)."""
