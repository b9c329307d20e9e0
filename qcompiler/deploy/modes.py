"""Exports capture a model in eval mode and leave every submodule's mode as they found it.

``model.train(was)`` after an export would restore the root's flag and set every submodule's to
it, so an eval-mode model inside a training-mode wrapper came back in training mode (dropout on).
``evaluating`` records each submodule's own flag and restores each.
"""
from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """``model`` and all its submodules in eval mode inside the block; each one's own mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
