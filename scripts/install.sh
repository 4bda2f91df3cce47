#!/usr/bin/env bash
# Creates .venv and installs the project into it, on a fresh machine, CPU-only.
# torch goes first and pinned: any later unpinned `torch` requirement is then already satisfied, so pip never
# pulls a multi-GB CUDA build. (Off this workplace, add `--index-url https://download.pytorch.org/whl/cpu`.)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# uv does the installs below (scripts/pip_install.sh: ~2x faster than pip here, pip when uv is not there)
.venv/bin/python -m pip install -q uv==0.13.9 || echo "install.sh: no uv; pip installs everything" >&2
bash scripts/pip_install.sh .venv/bin/python torch==2.13.0
bash scripts/pip_install.sh .venv/bin/python -e ".${extras:+[$extras]}"
