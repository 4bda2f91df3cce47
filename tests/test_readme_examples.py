"""Every ```python block of README.md runs, as written, against a real checkpoint and the local Hub server.

The README's paths (`checkpoints/run`, `global_step_500`, `alice/qwen-grpo`, org `acme`) are laid out in a scratch
folder: a real world-size-2 FSDP2 checkpoint renamed to step 500, and alice's token in `HF_TOKEN`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.fixture
def readme_sandbox(fsdp_checkpoints, hub, tmp_path, monkeypatch):
    ckpt = fsdp_checkpoints["w2_untied"]
    run = tmp_path / "checkpoints" / "run"
    shutil.copytree(ckpt.root, run)
    (run / f"global_step_{ckpt.step}").rename(run / "global_step_500")
    (run / "latest_checkpointed_iteration.txt").write_text("500")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_alice_local_token")
    return tmp_path


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_example_runs(readme_sandbox, index, capsys):
    code = BLOCKS[index]
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    if "consolidate_checkpoint" in code:
        assert out.startswith("500 2 ") and (readme_sandbox / "out" / "model" / "optimizer.pt").is_file()
    if "upload_checkpoint_to_hf" in code:
        from huggingface_hub import HfApi

        assert out.startswith("step-500 ")
        tags = {t.name for t in HfApi(token="hf_alice_local_token").list_repo_refs("alice/qwen-grpo").tags}
        assert "step-500" in tags
        acme = {t.name for t in HfApi(token="hf_alice_local_token").list_repo_refs("acme/qwen-grpo").tags}
        assert "step-500" in acme  # the backfill
