#!/usr/bin/env bash
# Every GPU check in one call, for a machine with one CUDA GPU (under 8 minutes on an H100/H200):
#   1. the GPU tests (tests/gpu and every Triton kernel test, compiled on CUDA: no -m filter, which would drop the unmarked kernel tests),
#   2. the GEMM table (benchmarks/gpu_gemm.py: each kernel vs bf16 cuBLAS, checked against the q-op reference),
#   3. the end-to-end table (benchmarks/gpu_e2e.py: decode tok/s and prefill ms of Llama-7B-sized layers),
#   4. the attention tables (benchmarks/gpu_attention.py: the fused 8-bit attention kernel vs bf16 SDPA, and decode
#      over a quantized KV cache: the fused cache-reading kernel vs the unfused read and bf16 SDPA).
# Tables and logs go to ${OUT:-gpu_results}/. Uses the Python environment it is run from (the GPU machine
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
step tests 240 python -m pytest -q tests/gpu/test_gpu.py tests/unit/test_triton_kernels.py tests/unit/test_triton_attention.py tests/unit/test_kv_attention.py -p no:cacheprovider
step gemm 120 python benchmarks/gpu_gemm.py --out "$out/gpu_gemm.txt"
step e2e 150 python benchmarks/gpu_e2e.py --layers 8 --recipes w4a16,w8a16,fp8,w8a8 --reps 20 --out "$out/gpu_e2e.txt"
step attention 90 python benchmarks/gpu_attention.py --out "$out/gpu_attention.txt"
echo "failed steps: $failed" | tee -a "$out/suite.log"
exit "$failed"
