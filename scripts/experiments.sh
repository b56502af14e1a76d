#!/usr/bin/env bash
# Run (or continue) the committed experiment grids: Table 1, the K_max sweep and the scorer ablation.
# Two processes of one thread each share every grid (--shard); re-run the same command after an
# interruption and finished cells are skipped. Results: results/<grid>/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
grids=("${@:-table1 kmax scorers}")
run_shard() {
  for grid in ${grids[*]}; do
    OMP_NUM_THREADS=1 fanlora experiment "configs/experiments/$grid.yaml" --resume --shard "$1"
  done
}
run_shard 0/2 &
run_shard 1/2 &
wait
for grid in ${grids[*]}; do
  fanlora experiment "configs/experiments/$grid.yaml" --aggregate
done
