#!/usr/bin/env bash
# Build docs/ as a static site (MkDocs, Material theme) into site/, failing on any warning (a broken link,
# a page missing from the nav). Sets up .venv first (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pip install -q -e ".[docs]"
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet "$@"
echo "docs → site/index.html"
