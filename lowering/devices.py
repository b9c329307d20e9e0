"""The device a compiled graph runs on: that of its first tensor input (the CPU without one)."""
from __future__ import annotations

import torch


def input_device(example_inputs) -> torch.device:
    return next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
