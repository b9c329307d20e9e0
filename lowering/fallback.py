"""What a ``target="auto"`` build runs: the picked target's callable, or Inductor's when it gave way.

Only ``target="auto"`` may fall back (an explicit target that cannot run, or runs slower, is the
user's contract: an error, or what was asked). A lowering that may give way wraps its result in
``Chosen``, which names the target whose code runs and why: ``explain`` reads ``running_target``,
``fallback_reason`` (the picked target gave way) and ``note`` (the measurement that kept it).

``shared_copy`` is the graph a lowering keeps to fall back on before it rewrites its own: a new
graph over the same constants (no weight is copied), with what AOTAutograd reads to recognise a
Dynamo graph.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

from torch import fx

from qcompiler import torch_compat


@dataclass
class Chosen:
    """A graph compiled under ``target="auto"``: the callable, the target whose code it is, and why."""

    fn: Callable
    running_target: str
    fallback_reason: Optional[str] = None  # set when the picked target gave way to ``running_target``
    note: str = ""                         # the measurement that kept the picked target

    def __call__(self, *args):
        return self.fn(*args)


def shared_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``'s graph copied node by node over the same parameters, buffers and submodules."""
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta = dict(getattr(gm, "meta", {}))
    torch_compat.copy_dynamo_sources(gm, new)
    return new
