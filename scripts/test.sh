#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite (what CI runs).
#   --fast   leave out the tests that train or load the real backbone (markers e2e, slow): about 2 minutes
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check fanlora tests benchmarks
if [ "${1:-}" = "--fast" ]; then
  shift
  set -- -m "not slow and not e2e" "$@"
fi
python -m pytest -q "$@"
