"""Reads and edits of an onnxscript IR graph that the ORT-form rewrites share (``onnx_rotary``,
``onnx_attention_cache``): a value's producer of a given op, a static dimension, and handing a
value's readers (a graph output among them, which keeps its name) to its replacement."""
from __future__ import annotations

from onnxscript import ir

HEADS = [0, 2, 1, 3]  # the Transpose between [B, S, H, D] and [B, H, S, D], either way


def producer(value, *op_types):
    """The node that computes ``value`` when it is a default-domain node of one of ``op_types``, else None."""
    node = value.producer() if value is not None else None
    if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in op_types:
        return None
    return node


def int_dim(value, axis: int):
    """``value``'s dimension ``axis`` when it is a known integer, else None."""
    shape = value.shape
    if shape is None or shape.rank() <= axis or not isinstance(shape[axis], int):
        return None
    return shape[axis]


def replace_keeping_name(old: ir.Value, new: ir.Value) -> None:
    """Every reader of ``old``, and the graph's outputs, read ``new`` instead; ``new`` takes
    ``old``'s name (a graph output keeps its name), shape and type."""
    new.shape, new.type = old.shape, old.type
    kept, old.name = old.name, None
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    new.name = kept
