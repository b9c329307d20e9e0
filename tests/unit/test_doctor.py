"""``qcompile doctor`` reports what this machine can run, from the same answers compilation uses:
each target's ``can_run``, ``target="auto"``'s choice, installed packages and CPU features."""
import subprocess
import sys

import torch

import qcompiler
from qcompiler.api import doctor
from qcompiler.lowering import LOWERINGS, auto_target


def test_targets_and_auto_are_the_compilers_own_answers():
    d = doctor.diagnose()
    example = [torch.zeros(2, 2)]
    assert set(d.targets) >= {(name, "cpu") for name in LOWERINGS}
    for name, low in LOWERINGS.items():
        assert d.targets[(name, "cpu")] == low.can_run(example)
    assert d.auto["cpu"][0] == auto_target("cpu", example)
    assert d.targets[("reference", "cpu")] == (True, "")
    assert ("cuda" in d.auto) == torch.cuda.is_available()


def test_every_recipe_is_listed_with_what_it_needs():
    d = doctor.diagnose()
    assert set(d.recipes) == set(qcompiler.list_recipes())
    assert d.recipes["w8a8"].startswith("nothing") and d.recipes["w8a8-smoothquant"].startswith("calibration data")
    assert "recipe=" in d.recipes["w4a16-gptq"] and "\nRecipes, and what each needs before compiling\n" in str(d)


def test_a_missing_package_and_missing_cpu_features_are_named(monkeypatch):
    real = doctor.importlib.util.find_spec
    monkeypatch.setattr(doctor.importlib.util, "find_spec", lambda n, *a: None if n == "tensorrt" else real(n, *a))
    monkeypatch.setattr(doctor, "_cpu_flags", lambda: {"avx2"})
    d = doctor.diagnose()
    assert d.packages["tensorrt"] is None and d.packages["torch"] is not None
    text = str(d)
    assert "tensorrt        not installed" in text
    assert "yes  AVX2" in text and "no   AVX-512 VNNI" in text
    assert any("no VNNI / AMX" in n for n in d.notes) and any("tensorrt is not installed" in n for n in d.notes)


def test_the_command_prints_every_section():
    run = subprocess.run([sys.executable, "-m", "qcompiler.api.cli", "doctor"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    for section in ("CPU", "GPU", "Packages", "Targets", 'target="auto" picks'):
        assert f"\n{section}\n" in run.stdout
