#!/usr/bin/env bash
# Installs everything on a fresh machine, then runs the CPU GRPO demo (python train_grpo.py, no arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python train_grpo.py "$@"
