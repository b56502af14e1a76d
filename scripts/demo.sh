#!/usr/bin/env bash
# Set up (idempotent) and run the end-to-end demo on the embedded backbone. Extra arguments go to `fanlora demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
fanlora demo "$@"
