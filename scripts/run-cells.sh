#!/usr/bin/env bash
# Run a grid's cells one after another on one thread, resumably (a finished cell is skipped, a killed one
# resumes from its last checkpoint), logging to runs/experiments/<grid>/worker-<name>.log:
#   nohup bash scripts/run-cells.sh placement A sql__fanlora__plop__s0 sql__fanlora__lora-drop__s0 &
# Pause it while timing anything: kill -STOP / -CONT the process group.
set -uo pipefail
cd "$(dirname "$0")/.."
grid=${1:?usage: bash scripts/run-cells.sh GRID NAME CELL...}; name=${2:?worker name}; shift 2
. .venv/bin/activate
log=runs/experiments/$grid/worker-$name.log
for cell in "$@"; do
  echo "$(date -u +%FT%TZ) start $cell" >> "$log"
  OMP_NUM_THREADS=1 fanlora experiment "configs/experiments/$grid.yaml" --resume --cells "$cell" >> "$log" 2>&1
  echo "$(date -u +%FT%TZ) end $cell rc=$?" >> "$log"
done
