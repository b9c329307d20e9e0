"""A new user's first hour, each case as they meet it: in a fresh Python process, the mistake
gives one qcompile exception whose first line names the problem and the fix, within seconds, with
no compiler stack; the command line answers help at once and bad files in one line."""
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import qcompiler

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# as a user's shell has it: no Triton CPU interpreter (the kernel tests turn it on)
ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
COMPILER_STACK = ("BackendCompilerFailed", "please report", "torch/_dynamo/output_graph.py", "convert_frame.py",
                  "torch/_inductor")


def run_python(code: str, timeout: float = 300):
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=timeout)
    return proc, time.perf_counter() - t


def last_line(text: str) -> str:
    return [line for line in text.strip().splitlines() if line.strip()][-1]


MODEL = """
import torch, qcompiler
from torch import nn
model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
x = torch.randn(2, 8, 64)
"""
CASES = [  # (what the user wrote, the exception type, a phrase its first line must hold)
    ('torch.compile(model, backend="qcompile", options={"recipe": "w8a8-smoothqaunt"})(x)',
     "OptionError", "unknown recipe 'w8a8-smoothqaunt'; valid recipes"),
    ('torch.compile(model, backend="qcompile", options={"recipe": "w8a8", "alhpa": 0.8})(x)',
     "OptionError", "unknown qcompile option(s) ['alhpa']"),
    ('torch.compile(model, backend="qcompile", options={"recipe": "w4a16", "group_size": 100})(x)',
     "OptionError", "INT4 needs group_size a power of two"),
    ('torch.compile(model, backend="qcompile", options={"recipe": "w8a8-static"})(x)',
     "CalibrationError", "qcompiler.calibrate"),
    ('torch.compile(model, backend="qcompile", options={"target": "triton"})(x)',
     "TargetUnavailable", "target 'triton' cannot run here"),
    ('torch.compile(model, backend="qcompile", options={"target": "tpu"})(x)',
     "OptionError", "unknown target 'tpu'"),
]


@pytest.mark.parametrize("code,kind,phrase", CASES, ids=[c[1] + "-" + str(i) for i, c in enumerate(CASES)])
def test_a_compile_mistake_is_one_qcompile_error_without_the_compiler_stack(code, kind, phrase):
    proc, _ = run_python(MODEL + code)
    assert proc.returncode != 0
    err = proc.stderr
    assert last_line(err).startswith(f"qcompiler.errors.{kind}: ") and phrase in last_line(err), err[-3000:]
    assert not any(s in err for s in COMPILER_STACK), err[-3000:]
    assert err.count('File "') <= 8, err  # the user's line, Dynamo's entry, qcompile's raise


def test_a_misspelled_recipe_fails_at_calibrate_before_any_batch_runs():
    proc, _ = run_python(MODEL + """
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a8-smoothqaunt"})
    ran = []
    try:
        with qcompiler.calibrate(fast):
            for _ in range(50):
                ran.append(fast(x))
    except qcompiler.OptionError as e:
        print("raised after", len(ran), "batches:", str(e).splitlines()[0])
    """.replace("\n    ", "\n"))
    assert "raised after 0 batches: unknown recipe 'w8a8-smoothqaunt'" in proc.stdout, proc.stderr[-2000:]


def test_a_misspelled_calibration_recipe_fails_before_calibrating():
    model = nn.Linear(8, 8)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(qcompiler.OptionError, match="unknown recipe 'w4a16-gtpq'"):
        qcompiler.calibrate(model, [torch.randn(2, 8)] * 3, recipe="w4a16-gtpq")
    assert not calls


def test_cli_help_is_fast_and_loads_no_torch():
    proc, _ = run_python("""
    import sys
    from qcompiler.api import cli
    for argv in (["--help"], ["export", "--help"], ["check", "--help"]):
        try:
            cli.main(argv)
        except SystemExit:
            pass
    print("torch loaded:", "torch" in sys.modules)
    """)
    assert "torch loaded: False" in proc.stdout, proc.stderr
    assert "w8a8-smoothquant-dynamic" in proc.stdout and "(default: w8a8-smoothquant)" in proc.stdout
    assert "``" not in proc.stdout
    assert _torch_loaded_by_cli("--help") == (0, False)


def _torch_loaded_by_cli(*argv) -> tuple:
    """(exit status, whether torch was imported) of ``python -m qcompiler.api.cli *argv``, as the
    command runs it. Loading no torch is what keeps such answers at once, measured without a
    wall clock that a loaded CI machine would make flaky."""
    proc, _ = run_python(f"""
    import runpy, sys
    sys.argv = ["qcompile", *{list(argv)!r}]
    try:
        runpy.run_module("qcompiler.api.cli", run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code
    print("RESULT", code, "torch" in sys.modules)
    """)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert line, proc.stderr
    _, code, loaded = line[0].split()
    return int(code), loaded == "True"


@pytest.mark.parametrize("content,phrase", [(None, "no such file"), (b"hello, not a model", "is not an ONNX model"),
                                            (b"", "is not an ONNX model")])
def test_cli_check_on_a_bad_file_is_one_line(tmp_path, content, phrase):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "qcompiler.api.cli", "check", str(path)], capture_output=True,
                          text=True, env=ENV, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcompile check: error: ") and phrase in lines[0], proc.stderr


def test_cli_export_rejects_an_unknown_recipe_at_once():
    argv = ["export", "--model", "minilm", "--recipe", "w8a8-smoothqaunt", "--out", "x.onnx"]
    proc = subprocess.run([sys.executable, "-m", "qcompiler.api.cli", *argv], capture_output=True, text=True, env=ENV,
                          cwd=ROOT)
    assert proc.returncode == 2 and "invalid choice: 'w8a8-smoothqaunt'" in proc.stderr
    assert _torch_loaded_by_cli(*argv) == (2, False)  # refused before loading torch or the model


def test_explain_says_when_nothing_was_quantized():
    class NoLinear(nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    fast = torch.compile(NoLinear(), backend="qcompile")
    fast(torch.randn(4, 4))
    text = str(qcompiler.explain(fast))
    assert "nothing was quantized: no linear layer was found" in text


def test_export_summary_names_the_layers_kept_in_floating_point(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    x = torch.randn(4, 8, 64)
    result = qcompiler.export_onnx(model, x, str(tmp_path / "m.onnx"), recipe="w8a8-static",
                                   calibration=[x], options={"skip": ["2"]})
    summary = result.summary()
    assert "1 of 2 linears quantized" in summary and "kept in floating point (1): 2: " in summary, summary
