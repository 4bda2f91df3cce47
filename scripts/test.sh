#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine, then runs lint and the whole test suite on CPU.
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -m "not slow"   # the fast tier: no Ray training runs
#   bash scripts/test.sh -k merge        # extra arguments go to pytest
# The install is skipped when .venv was already installed from this exact pyproject.toml + install scripts (a stamp
# file records their hash), so repeated runs go straight to the tests. Then .venv-vllm (vLLM's CPU backend, layered
# on .venv; ~20 s and 1.3 GB the first time, a second when up to date) for the tests marked `vllm`.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=".venv/.installed-test-$(cat pyproject.toml scripts/install.sh scripts/pip_install.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  bash scripts/install.sh test
  rm -f .venv/.installed-test-*
  touch "$stamp"
fi
bash scripts/install_vllm.sh
.venv/bin/ruff check .
# Two pytest workers (pytest-xdist): one test process alone leaves a core idle about half the time (Ray and vLLM
# start-up is mostly one process importing). Each expensive run stays on one worker (tests/conftest.py). Pass
# `-n 0` to run in one process.
exec .venv/bin/python -m pytest -n 2 "$@"
