#!/usr/bin/env bash
# Set up (idempotent) and run the test suite: everything but the tests marked slow or gpu, on
# two worker processes (pytest-xdist; QCOMPILE_TEST_WORKERS changes the number, 0 = in this process).
# Extra arguments replace the defaults and go to pytest (e.g. `-m slow` for the long real-model checks).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
. .venv/bin/activate
export QCOMPILE_CACHE="${QCOMPILE_CACHE:-$PWD/.cache}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$#" -eq 0 ]; then
  # --durations: the slowest tests at the end of the log, where the suite's time goes
  set -- -m "not slow and not gpu" -n "${QCOMPILE_TEST_WORKERS:-2}" --durations=25
  # one math thread per worker: the workers share the cores instead of oversubscribing them
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi
exit "$rc"
