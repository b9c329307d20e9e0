"""What a model's ``forward`` accepts, read from its signature."""
from __future__ import annotations

import inspect

from torch import nn


def takes_argument(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` has a parameter ``name`` (False when its signature cannot be read)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
