#!/usr/bin/env bash
# Make .gpu/ (git-ignored) for a lent GPU, which has torch, transformers, PEFT and accelerate but no network and
# takes at most 64 MiB of files per call (the repository included): the wheels of what fanlora's serving and
# benchmarks import beyond those (pure-Python or small; CPython 3.12, manylinux x86_64) and a saved copy of the
# embedded backbone's tokenizer (the 94 MB GGUF it comes from does not fit). Run here, with the index reachable:
#   bash scripts/gpu-prepare.sh        then carry .gpu with the repository and run scripts/gpu-check.sh there
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
. .venv/bin/activate
rm -rf .gpu && mkdir -p .gpu/whl
python -m pip download -q -d .gpu/whl --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -r scripts/gpu-requirements.txt
python - <<'PY'
from transformers import AutoTokenizer

from fanlora.backbone import EMBEDDED, resolve_source

AutoTokenizer.from_pretrained(resolve_source(EMBEDDED)[0]).save_pretrained(".gpu/tokenizer")
PY
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
carried=$(du -sb .gpu | cut -f1)
echo "gpu-prepare: .gpu holds $((carried / 1024)) KiB ($(ls .gpu/whl | wc -l) wheels); with the tracked tree $(((tree + carried) / 1048576)) MiB of the 64 MiB a call takes"
if [ $((tree + carried)) -gt $((64 * 1048576)) ]; then
  echo "error: repository + .gpu exceed 64 MiB: trim scripts/gpu-requirements.txt" >&2
  exit 2
fi
