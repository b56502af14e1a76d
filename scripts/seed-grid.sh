#!/usr/bin/env bash
# Seed a grid's settings (and cells that another grid already ran with the same recipe, setting and seed)
# from the committed results, so a fresh checkout trains on exactly the settings the study used — the demo
# re-run on another machine or thread count may keep a module or two differently.
#   bash scripts/seed-grid.sh decisive-pilot     bash scripts/seed-grid.sh decisive
set -euo pipefail
cd "$(dirname "$0")/.."
grid=${1:?usage: bash scripts/seed-grid.sh decisive|decisive-gsm8k|decisive-pilot|placement}
out=runs/experiments/$grid
. .venv/bin/activate
mkdir -p "$out/settings" "$out/cells"
[ -f "$out/experiment.json" ] || python - "configs/experiments/$grid.yaml" <<'PY'  # what `fanlora experiment` writes first
import sys
from fanlora import atomic
from fanlora.experiments.config import FORMAT, parse
exp = parse(sys.argv[1])
atomic.write_json(f"{exp.out}/experiment.json", {"format": FORMAT, "experiment": exp.to_dict()})
PY
scores=results/setting-study-pilot/search/scores.json  # the demo's exact AB-scores behind every study setting
rank() { printf '{"r": %s, "k_max": 2, "scorer": "%s", "setting": "%s", "search_run": "runs/demo"}\n' "$1" "$2" "$3"; }
copy_setting() {  # NAME FROM_GRID
  cp "results/$2/settings/$1.json" "results/$2/settings/$1.rank.json" "$out/settings/"
}
copy_cell() {  # CELL FROM_GRID
  [ -f "$out/cells/$1/cell.json" ] && return
  mkdir -p "$out/cells/$1"
  cp "results/$2/cells/$1/"{metrics.json,items.jsonl} "$out/cells/$1/"
  python - "$out/cells/$1/cell.json" "results/$2/cells/$1/cell.json" "$2" <<'PY'
import json, sys
record = json.load(open(sys.argv[2]))
record["copied_from"] = f"results/{sys.argv[3]}/cells/{record['id']}"
json.dump(record, open(sys.argv[1], "w"), indent=2)
PY
}
fanlora select --scores "$scores" --budget params=993024 --r1 12 --out "$out/settings/cost.tmp.json" --no-plots >/dev/null
case $grid in
  decisive-pilot)
    copy_setting ab setting-study; copy_setting vo setting-study
    mv "$out/settings/cost.tmp.json" "$out/settings/costfree.json"
    rank 12 ab-exact "budget:params=993024" > "$out/settings/costfree.rank.json"
    copy_cell sql__fanlora__ab__s0 setting-study; copy_cell sql__fanlora__vo__s0 setting-study ;;
  decisive)
    copy_setting ab setting-study-long; copy_setting random2 setting-study-long
    for v in vo all first-order; do copy_setting "$v" setting-study; done
    mv "$out/settings/cost.tmp.json" "$out/settings/costaware.json"
    rank 12 ab-exact "budget:params=993024" > "$out/settings/costaware.rank.json"
    copy_cell sql__fanlora__ab__s0 setting-study-long; copy_cell sql__fanlora__random2__s0 setting-study-long ;;
  decisive-gsm8k)  # the same setting files as decisive (its costaware from the same knapsack)
    copy_setting ab setting-study-long; copy_setting vo setting-study; copy_setting first-order setting-study
    mv "$out/settings/cost.tmp.json" "$out/settings/costaware.json"
    rank 12 ab-exact "budget:params=993024" > "$out/settings/costaware.rank.json" ;;
  placement)  # the decisive grid's ab, vo and first-order settings and cells; the rest is made by the grid
    rm "$out/settings/cost.tmp.json"
    for v in ab vo first-order; do
      copy_setting "$v" decisive
      for s in 0 1 2; do copy_cell "sql__fanlora__${v}__s$s" decisive; done
    done
    # `r1: budget` sizes every variant to the demo's AB setting at rank 12 (993,024 parameters): give the
    # grid the demo's exact AB-scores behind the study's settings rather than re-scoring a re-run stage a
    # (15 min, and a re-run may keep a module differently). The new scorers read this checkout's stage a.
    mkdir -p runs/demo && [ -f runs/demo/scores.json ] || cp "$scores" runs/demo/scores.json
    # the settings the new scorers made (results/placement/scores/; lora-drop's from the stage a re-run on
    # 2026-12-07) and every cell already published: a later checkout continues with exactly these
    for v in plop grad-norm lora-drop o-only; do
      [ -f "results/placement/settings/$v.json" ] && copy_setting "$v" placement
    done
    for cell in results/placement/cells/*/; do [ -d "$cell" ] && copy_cell "$(basename "$cell")" placement; done
    true ;;
  *) echo "no seeding recipe for $grid: give decisive, decisive-gsm8k, decisive-pilot or placement" >&2; exit 2 ;;
esac
echo "seeded $out: $(ls "$out/settings" | grep -vc rank) settings, $(ls "$out/cells" | wc -l) cells"
