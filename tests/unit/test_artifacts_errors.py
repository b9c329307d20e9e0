"""Saved-state artifacts refuse what they cannot trust, each with an error naming the problem and the
fix: no state, not an artifact, a newer format, another model's state, truncated or altered tensors,
files from two different saves."""
import json

import pytest
import torch

import qcompiler
from models import Stack
from qcompiler.deploy import artifacts


def _saved(tmp_path, seed=0):
    torch.manual_seed(seed)
    model = Stack(n=2, d=32, h=48)
    g = torch.Generator().manual_seed(1)
    qcompiler.calibrate(model, [torch.randn(2, 8, 32, generator=g) for _ in range(2)], progress=False)
    folder = tmp_path / "state"
    qcompiler.save(model, folder, recipe="w8a8-static")
    return model, folder


def _fresh(seed=0, **kw):
    torch.manual_seed(seed)
    return Stack(n=2, d=32, h=48, **kw)


def test_a_model_without_state_is_not_saved(tmp_path):
    with pytest.raises(qcompiler.CalibrationError, match="no quantization state.*calibrate"):
        qcompiler.save(_fresh(), tmp_path / "x")


def test_round_trip_restores_every_statistic_exactly(tmp_path):
    model, folder = _saved(tmp_path)
    other = _fresh(seed=5)  # same shapes, other weights: the state is keyed by names and shapes
    assert qcompiler.load(other, folder).name == "w8a8-static"
    a, b = qcompiler.state_of(model), qcompiler.state_of(other)
    assert sorted(a.stats) == sorted(b.stats) and len(a.stats) >= 4
    for name, s in a.stats.items():
        t = b.stats[name]
        assert torch.equal(s.rows, t.rows) and torch.equal(s.channel_absmax, t.channel_absmax)
        assert (s.tokens, s.max_rows, s.module) == (t.tokens, t.max_rows, t.module)
        assert torch.equal(s._gen.get_state(), t._gen.get_state())  # later calibration continues alike


def test_identical_statistics_are_stored_once(tmp_path):
    model, folder = _saved(tmp_path)
    from safetensors import safe_open

    with safe_open(str(folder / artifacts.TENSORS), framework="pt") as f:
        stored = len(list(f.keys()))
    named = sum(1 for e in json.loads((folder / artifacts.MANIFEST).read_text())["layers"].values()
                for k in ("channel_absmax", "rows", "generator") if e["stats"].get(k))
    assert stored < named  # every layer's generator state is the same tensor


def test_not_an_artifact(tmp_path):
    with pytest.raises(qcompiler.InvalidFile, match="not a qcompile artifact"):
        qcompiler.load(_fresh(), tmp_path)
    (tmp_path / artifacts.MANIFEST).write_text("{not json")
    with pytest.raises(qcompiler.InvalidFile, match="damaged"):
        qcompiler.load(_fresh(), tmp_path)
    (tmp_path / artifacts.MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(qcompiler.InvalidFile, match="not a qcompile state manifest"):
        qcompiler.load(_fresh(), tmp_path)


def test_a_newer_format_names_the_upgrade(tmp_path):
    _, folder = _saved(tmp_path)
    manifest = json.loads((folder / artifacts.MANIFEST).read_text())
    manifest["format_version"] = artifacts.FORMAT_VERSION + 1
    (folder / artifacts.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(qcompiler.InvalidFile, match="upgrade qcompiler"):
        qcompiler.load(_fresh(), folder)


@pytest.mark.parametrize("change,phrase", [
    (dict(d=48), "is \\[.*\\] float32 here"),           # every shape differs
    (dict(n=3), "this model has 'blocks.2"),              # an extra block
    (dict(n=1), "the saved model has 'blocks.1"),         # a missing block
])
def test_another_models_state_is_refused_naming_the_difference(tmp_path, change, phrase):
    _, folder = _saved(tmp_path)
    torch.manual_seed(0)
    kw = dict(n=2, d=32, h=48)
    kw.update(change)
    with pytest.raises(qcompiler.InvalidFile, match="another model.*" + phrase):
        qcompiler.load(Stack(**kw), folder)


def test_a_truncated_tensor_file_is_refused(tmp_path):
    _, folder = _saved(tmp_path)
    data = (folder / artifacts.TENSORS).read_bytes()
    (folder / artifacts.TENSORS).write_bytes(data[:len(data) // 2])
    with pytest.raises(qcompiler.InvalidFile, match="truncated or damaged"):
        qcompiler.load(_fresh(), folder)


def test_an_altered_tensor_is_refused(tmp_path):
    _, folder = _saved(tmp_path)
    data = bytearray((folder / artifacts.TENSORS).read_bytes())
    data[-3] ^= 0x40  # a bit flipped inside the last tensor's data
    (folder / artifacts.TENSORS).write_bytes(bytes(data))
    with pytest.raises(qcompiler.InvalidFile, match="does not match its hash"):
        qcompiler.load(_fresh(), folder)


def test_files_of_two_saves_are_refused(tmp_path):
    _, folder = _saved(tmp_path)
    _, other = _saved(tmp_path / "b", seed=3)
    (folder / artifacts.TENSORS).write_bytes((other / artifacts.TENSORS).read_bytes())
    with pytest.raises(qcompiler.InvalidFile, match="different saves"):
        qcompiler.load(_fresh(), folder)


def test_a_failed_load_leaves_the_state_alone(tmp_path):
    model, folder = _saved(tmp_path)
    before = dict(qcompiler.state_of(model).stats)
    data = (folder / artifacts.TENSORS).read_bytes()
    (folder / artifacts.TENSORS).write_bytes(data[:100])
    with pytest.raises(qcompiler.InvalidFile):
        qcompiler.load(model, folder)
    assert qcompiler.state_of(model).stats == before
