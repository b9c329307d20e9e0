"""Saved quantization state: calibrate once, compile in any later process without calibrating.

``save(model, path)`` writes what calibration and the weight algorithms left in the model's
``QuantState`` (activation statistics and their row samples, attention statistics, AWQ / GPTQ /
tuned INT4 codes and scales, AWQ input scales, ``auto``'s per-layer choices, the last run's
record) to a folder:

* ``state.safetensors``: every tensor, stored once per distinct content (linears that read one
  input record identical statistics) under the SHA-256 of its bytes;
* ``manifest.json``: format and qcompile versions, the recipe the state was made for, per layer
  the names of its tensors and its decision (recipe fields, reason, sensitivities), per attention
  module the names of its statistics' tensors (format 2; format 1 had none), and a fingerprint
  of the model (parameter names, shapes and dtypes).

No pickle anywhere: JSON and safetensors only. ``load(model, path)`` checks the format version,
the fingerprint against the model it is given and each tensor's hash, then replaces the model's
state; compiled graphs rebuild from it on their next call, exactly as after ``calibrate``. A
folder that is not an artifact, a newer format, another model's state, or a truncated or altered
tensor file is an ``InvalidFile`` naming the problem and the fix.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Optional, Union

import torch
from torch import Tensor, nn

from qcompiler import __version__
from qcompiler.calibration.state import linear_layers, sketches_agree, state_of, unwrap, weight_sketch
from qcompiler.calibration.stats import ActivationStats, AttentionStats, PreparedWeight
from qcompiler.errors import CalibrationError, InvalidFile, MissingDependency, OptionError
from qcompiler.ir.int4 import PackedInt4
from qcompiler.recipes import PREPARED_KEY_FIELDS, Recipe, get_recipe, resolve
from qcompiler.runtimes.host_memory import FilePages
from qcompiler.schemes.base import PerChannelWeight

FORMAT = "qcompile-state"
FORMAT_VERSION = 2  # 2: attention statistics
MANIFEST = "manifest.json"
TENSORS = "state.safetensors"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise MissingDependency("saving and loading quantization state needs safetensors: "
                                "pip install safetensors") from None
    return safetensors


def parameters_of(model: nn.Module) -> list:
    """``[[name, shape, dtype], ...]`` of the model's parameters and buffers, in state-dict order."""
    return [[name, list(t.shape), str(t.dtype).removeprefix("torch.")]
            for name, t in unwrap(model).state_dict(keep_vars=True).items()]


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's parameter and buffer names, shapes and dtypes (not their values)."""
    return hashlib.sha256(json.dumps(parameters_of(model)).encode()).hexdigest()


def _digest(t: Tensor) -> str:
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode() + data).hexdigest()


class _Tensors:
    """Tensors by content: ``put`` returns the name a tensor is stored under (its digest)."""

    def __init__(self):
        self.items: dict = {}

    def put(self, t: Optional[Tensor]) -> Optional[str]:
        if t is None:
            return None
        t = t.detach().to("cpu").contiguous()
        key = _digest(t)
        self.items.setdefault(key, t)
        return key


def _recipe_fields(recipe: Optional[Recipe]) -> Optional[dict]:
    if recipe is None:
        return None
    return recipe.as_fields()


def _recipe_from(fields: Optional[dict]) -> Optional[Recipe]:
    if fields is None:
        return None
    base = fields.get("name")
    try:  # a registered recipe keeps its description; any field may differ from it
        return get_recipe(base).replace(**{k: v for k, v in fields.items() if k != "description"})
    except OptionError:  # a recipe made by the user, not registered here
        return Recipe(**fields)


def _prepared_key(stored: list, recipe: Recipe) -> tuple:
    """The key as saved (JSON lists back to tuples); a key saved before a field joined
    ``PREPARED_KEY_FIELDS`` had that field at its default, which the saved recipe carries."""
    if len(stored) != len(PREPARED_KEY_FIELDS):
        return recipe.prepared_key
    return tuple(tuple(v) if isinstance(v, list) else v for v in stored)


def _weight_entry(name: str, w, tensors) -> Optional[dict]:
    """A prepared weight as the manifest holds it: INT4 codes in their packed layout, or trained
    8-bit codes with their per-channel scales."""
    if w is None:
        return None
    if isinstance(w, PackedInt4):
        return {"packed": tensors.put(w.packed), "scale": tensors.put(w.scale), "zero": tensors.put(w.zero),
                "group_size": w.group_size, "in_features": w.in_features}
    if isinstance(w, PerChannelWeight):
        return {"kind": "per_channel", "wq": tensors.put(w.wq), "wscale": tensors.put(w.wscale)}
    raise CalibrationError(f"layer {name!r}: a prepared weight of type {type(w).__name__} cannot be saved")


def _json_safe(value):
    """Tuples to lists; tensors and other objects become None (the run record is informational)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value if value is None or isinstance(value, (bool, int, float, str)) else None



def save(model: nn.Module, path: Union[str, os.PathLike], *, recipe=None) -> pathlib.Path:
    """Write ``model``'s quantization state to the folder ``path`` (created; its two files replaced).

    Args:
        model: the calibrated model, or ``torch.compile`` of it.
        path: a folder; it receives ``manifest.json`` and ``state.safetensors``.
        recipe: the recipe (name, ``Recipe`` or options dict) the state was calibrated for, kept in
            the manifest for the reader (``load`` returns it); optional.

    Returns the folder. Raises ``CalibrationError`` when the model holds no state to save.
    """
    st = _safetensors()
    state = state_of(model)
    if not state.stats and not state.prepared:
        raise CalibrationError("the model holds no quantization state to save: run "
                               "`qcompiler.calibrate(model, batches[, recipe=...])` first")
    if isinstance(recipe, dict):
        recipe = resolve(recipe)
    recipe = get_recipe(recipe) if recipe is not None else None
    tensors = _Tensors()
    layers: dict = {}
    for name, s in state.stats.items():
        layers.setdefault(name, {})["stats"] = {
            "module": s.module, "channel_absmax": tensors.put(s.channel_absmax), "rows": tensors.put(s.rows),
            "tokens": s.tokens, "max_rows": s.max_rows,
            "generator": tensors.put(s._gen.get_state()) if s._gen is not None else None}
    for name, p in state.prepared.items():
        layers.setdefault(name, {})["prepared"] = {
            "recipe": _recipe_fields(p.recipe), "key": list(p.key), "reason": p.reason,
            "source": tensors.put(state.sources.get(name)),
            "sensitivity": [[k, v] for k, v in p.sensitivity.items()],
            "smooth_scale": tensors.put(p.smooth_scale),
            "trained": p.trained, "x_scale": tensors.put(p.x_scale),
            "weight": _weight_entry(name, p.weight, tensors)}
    attention = {name: {"module": a.module, "tokens": a.tokens,
                        **{k: tensors.put(t) for k, t in a.tensors().items()}} for name, a in state.attention.items()}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "qcompile_version": __version__,
        "torch_version": torch.__version__, "recipe": _recipe_fields(recipe),
        "fingerprint": fingerprint(model), "parameters": parameters_of(model),
        "last_run": _json_safe(state.last_run), "layers": layers, "attention": attention,
    }
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    # the tensors first, the manifest last: a folder with a manifest has its tensors complete
    tmp = out / (TENSORS + ".tmp")
    st.torch.save_file(tensors.items, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, out / TENSORS)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, allow_nan=False))
    os.replace(tmp, out / MANIFEST)
    return out


def read_manifest(path: Union[str, os.PathLike]) -> dict:
    """The manifest of the artifact folder ``path``, its format and version checked."""
    folder = pathlib.Path(path)
    file = folder / MANIFEST
    if not file.is_file():
        raise InvalidFile(f"{folder} is not a qcompile artifact (no {MANIFEST}): write one with "
                          f"`qcompiler.save(model, path)` or `qcompile quantize --out {folder}`")
    try:
        manifest = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidFile(f"{file} is damaged ({e}): save the model's state again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InvalidFile(f"{file} is not a qcompile state manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InvalidFile(f"{folder} was written in artifact format {version!r} by qcompile "
                          f"{manifest.get('qcompile_version')}; this qcompile reads format {FORMAT_VERSION} "
                          f"and older: upgrade qcompiler (pip install -U qcompiler)")
    return manifest


def _mismatch(saved: list, model: nn.Module) -> str:
    mine = {n: (s, d) for n, s, d in parameters_of(model)}
    theirs = {n: (s, d) for n, s, d in saved}
    for name, (shape, dtype) in theirs.items():
        if name not in mine:
            return f"the saved model has {name!r}, this one does not"
        if mine[name] != (shape, dtype):
            return f"{name!r} is {mine[name][0]} {mine[name][1]} here, {shape} {dtype} in the saved model"
    extra = sorted(set(mine) - set(theirs))
    return f"this model has {extra[0]!r}, the saved one does not" if extra else "the parameter order differs"


def load(model: nn.Module, path: Union[str, os.PathLike]) -> Optional[Recipe]:
    """Replace ``model``'s quantization state by the one saved in the folder ``path``.

    Afterwards ``torch.compile(model, backend="qcompile", options=...)`` (or a model already
    compiled) needs no calibration and builds the same graphs as the model that was saved.
    Returns the recipe the state was saved with (None if ``save`` was not told).
    """
    st = _safetensors()
    manifest = read_manifest(path)
    folder = pathlib.Path(path)
    if manifest.get("fingerprint") != fingerprint(model):
        raise InvalidFile(f"{folder} holds the quantization state of another model "
                          f"({_mismatch(manifest.get('parameters', []), model)}): load it into the model "
                          f"it was saved from, or calibrate this one")
    file = folder / TENSORS
    if not file.is_file():
        raise InvalidFile(f"{folder} has a manifest but no {TENSORS}: save the model's state again")
    weights = {name: mod.weight for name, mod in linear_layers(unwrap(model))}
    names = set(weights)
    modules = {name for name, _ in unwrap(model).named_modules()}
    try:
        with st.safe_open(str(file), framework="pt") as f:
            available = set(f.keys())
            read: dict = {}  # a tensor shared by several layers is read and hashed once
            # the tensors read are views of the mapped file, and hashing one reads every page of it;
            # the model's weights too, read for their sketches: released one by one once read (the
            # kernel reads a page again when it is touched), so that loading does not hold the
            # whole file and every weight resident at once (most rows are never read again)
            pages = FilePages()

            def get(key: Optional[str]) -> Optional[Tensor]:
                if key is None:
                    return None
                if key in read:
                    return read[key]
                if key not in available:
                    raise InvalidFile(f"{file} lacks tensor {key[:12]}... that {MANIFEST} names: the two files "
                                      f"come from different saves; save the model's state again")
                t = f.get_tensor(key)
                if _digest(t) != key:
                    raise InvalidFile(f"{file} is damaged (tensor {key[:12]}... does not match its hash): "
                                      f"save the model's state again")
                pages.release([t])
                read[key] = t
                return t

            stats, prepared, changed, sketches = {}, {}, [], {}
            for name, entry in manifest["layers"].items():
                if name not in names:
                    raise InvalidFile(f"{folder} has state for layer {name!r}, which this model lacks")
                if "stats" in entry:
                    s = entry["stats"]
                    gen = torch.Generator()
                    gen_state = get(s.get("generator"))
                    if gen_state is not None:
                        gen.set_state(gen_state)
                    else:
                        gen.manual_seed(0)
                    stats[name] = ActivationStats(s["module"], get(s["channel_absmax"]), get(s["rows"]),
                                                  s["tokens"], s["max_rows"], gen)
                if "prepared" in entry:
                    p = entry["prepared"]
                    w = p["weight"]
                    if w is None:
                        weight = None
                    elif w.get("kind") == "per_channel":
                        weight = PerChannelWeight(get(w["wq"]), get(w["wscale"]))
                    else:
                        weight = PackedInt4(get(w["packed"]), get(w["scale"]), get(w["zero"]), w["group_size"],
                                            w["in_features"])
                    source = get(p.get("source"))
                    sketches[name] = weight_sketch(weights[name])  # what the state keeps to notice a change
                    pages.release([weights[name]])
                    if source is not None and not sketches_agree(sketches[name], source):
                        changed.append(name)
                    recipe = _recipe_from(p["recipe"])
                    trained = bool(p.get("trained", False))
                    key = tuple(tuple(v) if isinstance(v, list) else v for v in p["key"]) if trained else \
                        _prepared_key(p["key"], recipe)
                    prepared[name] = PreparedWeight(recipe, key, weight, get(p["smooth_scale"]), p["reason"],
                                                    {k: v for k, v in p["sensitivity"]}, trained,
                                                    get(p.get("x_scale")))
            attention = {}
            for name, entry in manifest.get("attention", {}).items():
                if name not in modules:
                    raise InvalidFile(f"{folder} has attention statistics for module {name!r}, which this model lacks")
                attention[name] = AttentionStats(entry["module"], *(get(entry[k]) for k in AttentionStats.TENSORS),
                                                 entry["tokens"])
        if changed:
            raise InvalidFile(
                f"{folder} holds codes prepared from other weights than this model's for {', '.join(changed[:4])}"
                f"{' and more' if len(changed) > 4 else ''} (the model was fine-tuned or changed since the state "
                f"was saved): calibrate this model, or load the state into the model it was saved from")
    except InvalidFile:
        raise
    except Exception as e:  # safetensors' own errors: a truncated or garbled file
        raise InvalidFile(f"{file} cannot be read ({type(e).__name__}: {e}); it is truncated or damaged: "
                          f"save the model's state again") from None
    state = state_of(model)
    state.clear()
    state.update(stats=stats, prepared=prepared, last_run=manifest.get("last_run") or {}, attention=attention,
                 sources=sketches)
    return _recipe_from(manifest.get("recipe"))
