#!/usr/bin/env bash
# Copy a grid's finished cells (cell.json, metrics.json, items.jsonl, and a searched method's
# search/structure.json), its settings and experiment.json into results/<grid>/, beside the tables that
# `fanlora experiment` writes there, so every paired statistic can be recomputed from the repository alone
# and another checkout can continue the grid:
#   bash scripts/publish-grid.sh setting-study
#   mkdir -p runs/experiments/setting-study && cp -r results/setting-study/{experiment.json,settings,cells} runs/experiments/setting-study/
set -euo pipefail
cd "$(dirname "$0")/.."
grid=${1:?usage: bash scripts/publish-grid.sh GRID (a folder under runs/experiments/)}
src=runs/experiments/$grid
dst=results/$grid
[ -f "$src/experiment.json" ] || { echo "no grid at $src: give the name of a folder under runs/experiments/" >&2; exit 2; }
mkdir -p "$dst/cells" "$dst/settings"
cp "$src/experiment.json" "$dst/"
cp "$src"/settings/*.json "$dst/settings/" 2>/dev/null || true
for cell in "$src"/cells/*/; do
  id=$(basename "$cell")
  [ -f "$cell/cell.json" ] || continue  # unfinished cells stay behind
  mkdir -p "$dst/cells/$id"
  for f in cell.json metrics.json items.jsonl; do [ -f "$cell/$f" ] && cp "$cell/$f" "$dst/cells/$id/"; done
  if [ -f "$cell/search/structure.json" ]; then
    mkdir -p "$dst/cells/$id/search" && cp "$cell/search/structure.json" "$dst/cells/$id/search/"
  fi
done
echo "published $(ls "$dst/cells" | wc -l) cells of $grid → $dst"
