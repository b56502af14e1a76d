#!/usr/bin/env bash
# One prepared check for a lent GPU (no network; the repository and .gpu/ from scripts/gpu-prepare.sh, ≤ 64 MiB):
#   1. the `cuda` tests (tests/test_cuda.py): engine, continuous batching, paged KV, prefix cache on the device;
#   2. `fanlora bench` at the paper's shape (Table 3: base / FanLoRA engine and PEFT / LoRA-all / AdaLoRA / (IA)3,
#      beam 1 and 3, 276-token prompt, 32 new tokens, tokens/s and CUDA peak memory; the multi-tenant batch);
#   3. `fanlora serve` on the same shape with 16 random adapters under closed-loop load
#      (benchmarks/shape_serve.py: 16 distinct adapters ÷ one adapter ÷ base throughput).
# Every result goes under $OUT (default benchmarks/results/gpu/). A step that fails does not stop the next one
# (a lent GPU gives one chance); the script then exits 1 naming them. Sized (an estimate: it has never run on
# a GPU) for under 8 minutes at 7B in bf16.
#   GPU_CHECK_DEVICE=cpu  the CPU rehearsal (tests/test_gpu_check.py runs it in CI on a tiny shape, so this
#                         script cannot rot): the cuda tests run on the CPU, everything else as on the GPU
#   GPU_CHECK_SHAPE  (llama-2-7b)  GPU_CHECK_DTYPE (bfloat16)  GPU_CHECK_ROUNDS (3)  GPU_CHECK_SECONDS (6)
#   GPU_CHECK_PROMPT (276)  GPU_CHECK_NEW (32)  GPU_CHECK_ADAPTERS (16)  GPU_CHECK_SETTING (a FanLoRA setting)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SHAPE=${GPU_CHECK_SHAPE:-llama-2-7b}
DTYPE=${GPU_CHECK_DTYPE:-bfloat16}
ROUNDS=${GPU_CHECK_ROUNDS:-3}
SECONDS_PER_VISIT=${GPU_CHECK_SECONDS:-6}
PROMPT=${GPU_CHECK_PROMPT:-276}
NEW=${GPU_CHECK_NEW:-32}
ADAPTERS=${GPU_CHECK_ADAPTERS:-16}
SETTING=${GPU_CHECK_SETTING:-results/decisive/settings/ab.json}
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d .gpu/whl ]; then  # offline: only what this machine lacks
  "$PY" -m pip install -q --no-index --find-links .gpu/whl -r scripts/gpu-requirements.txt 2>&1 | tail -3
fi
if [ -d .gpu/tokenizer ]; then export FANLORA_TOKENIZER="$ROOT/.gpu/tokenizer"; fi
if [ "$DEVICE" = cpu ]; then export FANLORA_TEST_DEVICE=cpu; fi
start=$(date +%s)
failed=""
step() { echo "[gpu-check +$(($(date +%s) - start)) s] $*" | tee -a "$OUT/steps.txt"; }

step "environment"
"$PY" - >"$OUT/environment.txt" 2>&1 <<'PY' || true
import platform, torch, transformers, peft
print("python", platform.python_version(), "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| peft", peft.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PY
command -v nvidia-smi >/dev/null && nvidia-smi >>"$OUT/environment.txt" 2>&1 || true

step "1/3 the cuda tests on $DEVICE"
"$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py >"$OUT/cuda-tests.txt" 2>&1 || failed="$failed tests"
tail -1 "$OUT/cuda-tests.txt"

step "2/3 fanlora bench --backbone shape:$SHAPE --dtype $DTYPE --device $DEVICE"
"$PY" -m fanlora bench --setting "$SETTING" --backbone "shape:$SHAPE" --dtype "$DTYPE" --device "$DEVICE" \
  --rounds "$ROUNDS" --prompt-tokens "$PROMPT" --new-tokens "$NEW" --tenants "$ADAPTERS" \
  --out "$OUT/table3.txt" >"$OUT/table3.log" 2>&1 || failed="$failed bench"
tail -1 "$OUT/table3.log"

step "3/3 fanlora serve on shape:$SHAPE with $ADAPTERS adapters under load"
"$PY" benchmarks/shape_serve.py --setting "$SETTING" --backbone "shape:$SHAPE" --dtype "$DTYPE" --device "$DEVICE" \
  --adapters "$ADAPTERS" --rounds "$ROUNDS" --seconds "$SECONDS_PER_VISIT" --warmup 1 \
  --log "$OUT/serve.log" --out "$OUT/serve.txt" >"$OUT/serve-bench.log" 2>&1 || failed="$failed serve"
tail -1 "$OUT/serve-bench.log"
if [ -n "$failed" ]; then  # every step ran (a lent GPU gives one chance); what failed is in its own file
  step "failed:$failed (see $OUT)"
  exit 1
fi
step "done"
