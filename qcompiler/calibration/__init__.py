"""What calibration learns and where it lives: the statistics records (``stats``), the hooks that
record them (``recorder``), the block-by-block runner for weight algorithms (``blockwise``), the
observers that turn statistics into static scales (``observers``) and the model's own
``QuantState`` (``state``)."""
