#!/usr/bin/env bash
# Creates .venv and installs the project into it, on a fresh machine, CPU-only.
# torch goes first and pinned: any later unpinned `torch` requirement is then already satisfied, so pip never
# pulls a multi-GB CUDA build. (Off this workplace, add `--index-url https://download.pytorch.org/whl/cpu`.)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
