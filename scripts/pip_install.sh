#!/usr/bin/env bash
# `pip install ARGS` into the environment of TARGET_PYTHON, done by uv when it can (same packages, same versions:
# a fresh .venv in ~40 s instead of ~65 s on 2 cores, caches empty), by pip otherwise.
#   bash scripts/pip_install.sh .venv/bin/python -e ".[test]"
#   VERL_GRPO_HUB_NO_UV=1 bash scripts/pip_install.sh ...     # pip only
# uv is the one install.sh put in .venv (pinned there). It reads no pip configuration, so the index, extra indexes,
# find-links and constraints that `pip config list` reports are passed on as flags (this workplace, for one, keeps
# torch's CPU wheel in a find-links folder and caps torch in a constraints file), with pip's way of choosing among
# indexes (the best version over all of them: uv's default would stop at the first index that has the package).
# When uv is missing or fails, pip does the install, so uv never decides whether an install works.
set -euo pipefail
cd "$(dirname "$0")/.."  # paths below (.venv, TARGET_PYTHON, "-e .") are from the repo root
target=$1
shift
base=.venv/bin/python
uv=.venv/bin/uv
if [ -x "$uv" ] && [ -z "${VERL_GRPO_HUB_NO_UV:-}" ]; then
  mapfile -t config < <("$base" - <<'PY'
import ast
import subprocess
import sys

out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}
seen = set()
for line in out.splitlines():  # e.g. global.find-links='/opt/wheels' or :env:.extra-index-url='a b'
    key, _, value = line.partition("=")
    name = key.rsplit(".", 1)[-1]
    try:
        values = str(ast.literal_eval(value)).split()
    except (ValueError, SyntaxError):
        continue
    if name == "cert" and "--native-tls" not in seen:  # a CA configured for pip: let uv use the system's store too
        seen.add("--native-tls")
        print("--native-tls")
    for v in values if name in flags else []:
        if (name, v) not in seen:
            seen.add((name, v))
            print(flags[name])
            print(v)
PY
  )
  if "$uv" pip install -q --compile-bytecode --python "$target" --index-strategy unsafe-best-match \
      "${config[@]}" "$@"; then
    exit 0
  fi
  echo "pip_install.sh: uv could not install $*; trying pip" >&2
fi
exec "$base" -m pip --python "$target" install -q "$@"
