#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine, then runs lint and the whole test suite on CPU.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -k merge   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
