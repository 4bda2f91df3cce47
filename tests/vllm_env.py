"""Where the vLLM tests find vLLM: the second virtualenv `.venv-vllm` that `scripts/install_vllm.sh` builds.

The main .venv has no vLLM (it stays light for the demo); tests marked `vllm` run their vLLM parts as subprocesses of
`.venv-vllm/bin/python` (or `$VERL_GRPO_HUB_VLLM_PYTHON`) and skip, saying how to get it, only when it is absent.
`bash scripts/test.sh` installs it first, so CI always runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("VERL_GRPO_HUB_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
SKIP_REASON = (
    f"vLLM tests need the vLLM-on-CPU virtualenv, {VLLM_PYTHON} is missing: run `bash scripts/install_vllm.sh` "
    "(`bash scripts/test.sh` does)"
)
needs_vllm = pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason=SKIP_REASON)


def vllm_env(**extra: str) -> dict[str, str]:
    """The test process's environment for a `.venv-vllm` subprocess: this checkout first on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONPATH"] = str(REPO)
    return {**env, **extra}


def run_vllm_checks(args: list[str], *, cwd: Path, env: dict[str, str], timeout: int = 600, log: Path | None = None):
    """Run `python -m tests.vllm_checks ARGS` in .venv-vllm; return its JSON result."""
    out = subprocess.run([str(VLLM_PYTHON), "-m", "tests.vllm_checks", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=timeout)
    text = out.stdout + out.stderr
    if log is not None:
        log.write_text(text)
    assert out.returncode == 0, text[-6000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("VLLM_CHECKS ")][-1]
    return json.loads(line[len("VLLM_CHECKS "):])
