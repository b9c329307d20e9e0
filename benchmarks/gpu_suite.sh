#!/usr/bin/env bash
# Every GPU check in one call, for a machine with one CUDA GPU, in at most 6 minutes on an H200
# (each step has its own time limit; a step cut by its limit keeps what it printed):
#   1. the GPU tests: tests/gpu, the kernel-choice tests (tinygemm, every candidate against the
#      reference) and the weight-only kernel tests, compiled on CUDA,
#   2. the GEMM table (benchmarks/gpu_gemm.py: every kernel the lowering can choose, vs bf16 cuBLAS,
#      checked against the q-op reference; the fastest of each family marked),
#   3. the end-to-end table (benchmarks/gpu_e2e.py: decode tok/s and prefill ms of Llama-7B-sized
#      layers; accuracy against qcompile's reference target on the same weights; chosen kernels),
#   4. the attention tables (benchmarks/gpu_attention.py).
#   bash benchmarks/gpu_suite.sh [--quick]    # --quick: one GEMM shape, two recipes, no attention
# Tables, logs and the results page (gpu_speed.md, for docs/results/) go to ${OUT:-gpu_results}/. Uses the Python environment it is run from (the GPU machine
# brings torch and triton); installs nothing. Each step runs even if an earlier one fails; the exit status
# is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
export PYTHONPATH="$PWD/tests:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
failed=0
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$out/suite.log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/suite.log"
  [ "$rc" = 0 ] || failed=$((failed + 1))
}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: gpu_suite.sh needs one')" || exit 1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/suite.log"
quick=0; [ "${1:-}" = "--quick" ] && quick=1
# the kernels at decode sizes (M = 1, 8, 16) and a prefill, the 8-bit attention kernel, the quantized-KV
# kernel in generate(), CUDA graphs: what the CPU interpreter cannot check (bf16 products, autotuning)
# (the last H200 run took ~18 s a test, compiles and autotuning included: one recipe per kernel family;
# the end-to-end step gets the most time: its first row compiles and times every candidate kernel)
# and the private torch APIs the package uses, checked on this machine's torch (qcompiler/torch_compat.py)
step tests 60 python -m pytest -q tests/unit/test_kernel_choice.py tests/gpu/test_gpu.py tests/unit/test_torch_compat.py \
  -p no:cacheprovider -k "tinygemm or every_candidate or (bfloat16 and w4a16) or attention_kernel or \
  (quantized_kv_kernel and int8) or (cuda_graphs and w4a16) or torch_compat"
if [ "$quick" = 1 ]; then
  step gemm 60 python benchmarks/gpu_gemm.py --shapes 4096x11008 --kinds w4a16,w8a16 --out "$out/gpu_gemm.txt"
  step e2e 230 python benchmarks/gpu_e2e.py --layers 8 --recipes w4a16,fp8 --reps 50 --out "$out/gpu_e2e.txt"
else
  step gemm 80 python benchmarks/gpu_gemm.py --shapes 4096x11008,11008x4096 --out "$out/gpu_gemm.txt"
  step e2e 180 python benchmarks/gpu_e2e.py --layers 8 --recipes w4a16,w8a16,fp8 --reps 50 --out "$out/gpu_e2e.txt"
  step attention 30 python benchmarks/gpu_attention.py --out "$out/gpu_attention.txt"
fi
echo "failed steps: $failed" | tee -a "$out/suite.log"
# the results page of this run (the GPU machine's copy of the tree has no git: QCOMPILE_COMMIT names the commit)
python benchmarks/gpu_results_page.py "$out" --commit "${QCOMPILE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" \
  --date "$(date -u +%F)" --command "bash benchmarks/gpu_suite.sh $*" --page "$out/gpu_speed.md"
exit "$failed"
