#!/usr/bin/env bash
# The main job: set up, then quantize, compile and measure real models (SmolLM2-135M and
# all-MiniLM-L6-v2) on the embedded defaults, and print the table. Arguments go to
# benchmarks/accuracy.py (default --quick; pass --full for the whole table).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export QCOMPILE_CACHE="${QCOMPILE_CACHE:-$PWD/.cache}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "--full" ]; then shift; else set -- --quick "$@"; fi
python benchmarks/accuracy.py "$@"
# ... and exported: MiniLM in TensorRT's QDQ form, checked against its explicit-quantization rules
mkdir -p .cache/exports
qcompile export --model minilm --recipe w8a8-smoothquant --calib 4 --out .cache/exports/minilm-w8a8-smoothquant.onnx
