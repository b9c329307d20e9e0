"""Every Triton kernel compiles for the H100 (sm_90) on this CPU machine, in every launch variant.

The interpreter tests (test_triton_kernels.py) check the arithmetic, but the interpreter runs
Python, not Triton's compiler: code the compiler rejects (a constexpr branch returning another
type than the code after it) and launch plumbing the interpreter skips (the autotuner prunes
configs only when it has several) passed CI and failed on the first GPU run. Here each kernel is
built down to a cubin with ``triton.compile`` (tests/triton_compile_cases.py, in a subprocess
without the interpreter), and the pruning functions are called the way the autotuner calls them.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

import triton_compile_cases  # noqa: E402
from qcompiler.runtimes import triton_tuning as tuning  # noqa: E402

CASE_IDS = sorted(triton_compile_cases.cases())


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, triton_compile_cases.__file__], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_kernel_compiles_for_sm90(compiled, case_id):
    assert compiled[case_id] == "ok", compiled[case_id]


def test_every_launch_config_is_a_case():
    configs = (tuning.ALL_W8A8 + tuning.ALL_W8A8_GEMV + tuning.ALL_WEIGHT_ONLY_GEMV + tuning.ALL_WEIGHT_ONLY_GEMV1 + tuning.ALL_PACKED_GEMV
               + tuning.ALL_PACKED_GEMM)
    ids = " ".join(CASE_IDS)
    assert all(triton_compile_cases._config_id(c) in ids for c in configs)


@pytest.mark.parametrize("prune,configs,m,largest", [
    (tuning.prune_w8a8, tuning.ALL_W8A8, 1, 16), (tuning.prune_w8a8, tuning.ALL_W8A8, 2048, 256),
    (tuning.prune_w8a8, tuning.ALL_W8A8, 128, 128)])
@pytest.mark.parametrize("how", ["keyword", "positional"])
def test_config_pruning_reads_m_as_the_autotuner_passes_it(prune, configs, m, largest, how):
    # the launchers pass M_BUCKET by keyword, and the autotuner hands keyword arguments to the
    # pruner as **kwargs (positional ones in named_args)
    kept = prune(configs, {}, M_BUCKET=m) if how == "keyword" else prune(configs, {"M_BUCKET": m})
    assert kept and max(c.kwargs["BLOCK_M"] for c in kept) == largest
