"""The uploaded model card shows the results: val exact accuracy per task (start and now), the training curves PNG
uploaded beside the model, the tasks with their configs, and a load-and-generate snippet that runs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from tests.test_progress_report import RECORDS, write_log
from training.report import CURVES_FILE, curves_for_step, find_metric_logs, read_metrics
from utils.hf_uploader import HuggingFaceUploader
from utils.hub.card import CardInfo, is_generated_card, render_model_card

ALICE = "hf_alice_local_token"
FAST = dict(retry_base_delay=0.01, progress=False)
CARD_INFO = {
    "datasets": {"chain_sum": 1.0},
    "dataset_configs": {"chain_sum": {"min_terms": 2, "max_terms": 2}},
    # the test checkpoint's word-level tokenizer knows only w0, w1, ...; quoting is checked in a unit test below
    "system_prompt": "w7 w8",
    "example_question": "w1 w2 w3",
    "max_new_tokens": 8,  # the test model has 64 positions
}


@pytest.fixture
def run_with_curves(fsdp_checkpoints, tmp_path) -> tuple[Path, dict[str, float]]:
    """A run dir whose step directory holds the trainer's curves PNG, and the card metrics the trainer computed."""
    run = tmp_path / "run"
    shutil.copytree(fsdp_checkpoints["w2_untied"].step_dir, run / "global_step_2")
    log = write_log(run, RECORDS[:3])  # step 0 validation, steps 1-2 training
    metrics = curves_for_step(log, 2, {"val-aux/chain_sum/exact/mean@1": 0.5, "critic/score/mean": 0.75},
                              run / "global_step_2" / CURVES_FILE)
    return run, metrics


def test_card_shows_results_curves_and_task_configs(hub, run_with_curves):
    from huggingface_hub import HfApi, hf_hub_download

    run, metrics = run_with_curves
    assert metrics == {"train/reward": 0.75, "val/chain_sum/exact_acc": 0.5,
                       "val/chain_sum/exact_acc_at_start": 0.25, "val_start_step": 0.0, "val_samples": 1.0}
    up = HuggingFaceUploader("alice/card-results", private=True, token=ALICE, card_info=CARD_INFO, **FAST)
    up.upload_from_checkpoint_dir(run / "global_step_2", metrics=metrics)

    files = HfApi(token=ALICE).list_repo_files("alice/card-results", revision="step-2")
    assert CURVES_FILE in files
    png = Path(hf_hub_download("alice/card-results", CURVES_FILE, revision="step-2", token=ALICE))
    assert png.read_bytes() == (run / "global_step_2" / CURVES_FILE).read_bytes()
    card = Path(hf_hub_download("alice/card-results", "README.md", revision="step-2", token=ALICE)).read_text()
    assert is_generated_card(card)
    assert "| chain_sum | 25.0% | 50.0% | +25.0 points |" in card
    assert "| task | step 0 | step 2 | change |" in card
    assert f"]({CURVES_FILE})" in card  # the image, by its path beside the card
    assert '| chain_sum | 1 | `{"max_terms": 2, "min_terms": 2}` |' in card
    assert "Mean training reward at step 2: 0.750." in card
    assert ModelCard(card).data.to_dict()["metrics"]["val/chain_sum/exact_acc"] == 0.5

    [snippet] = re.findall(r"## Load it and generate\n\n```python\n(.*?)```", card, re.S)
    assert 'revision="step-2"' in snippet and '"content": "w1 w2 w3"' in snippet and "max_new_tokens=8" in snippet


def test_the_card_snippet_loads_the_model_and_generates(hub, tiny_model_dir, tmp_path, monkeypatch):
    from huggingface_hub import hf_hub_download

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    info = {**CARD_INFO, "system_prompt": 'Answer in <answer> tags.\nBe "brief".', "max_new_tokens": 16,
            "example_question": "State the final answer to the following arithmetic problem: 4 - 1 ="}
    HuggingFaceUploader("alice/card-snippet", private=True, token=ALICE, card_info=info, **FAST).upload_folder(
        folder, 5)
    card = Path(hf_hub_download("alice/card-snippet", "README.md", revision="step-5", token=ALICE)).read_text()
    [snippet] = re.findall(r"## Load it and generate\n\n```python\n(.*?)```", card, re.S)
    monkeypatch.setenv("HF_TOKEN", ALICE)  # a private repo: the reader's own login
    printed = []
    exec(compile(snippet, "model-card-snippet", "exec"), {"print": printed.append})  # noqa: S102 - our own card
    assert len(printed) == 1 and isinstance(printed[0], str)


def test_hand_written_card_is_still_never_replaced(hub, run_with_curves):
    from huggingface_hub import HfApi, hf_hub_download

    run, metrics = run_with_curves
    api = HfApi(token=ALICE)
    api.create_repo("alice/own-card", private=True)
    api.upload_file(path_or_fileobj=b"# Mine\n", path_in_repo="README.md", repo_id="alice/own-card")
    HuggingFaceUploader("alice/own-card", private=True, token=ALICE, card_info=CARD_INFO,
                        **FAST).upload_from_checkpoint_dir(run / "global_step_2", metrics=metrics)
    assert Path(hf_hub_download("alice/own-card", "README.md", revision="step-2", token=ALICE)).read_text() == "# Mine\n"
    assert CURVES_FILE in api.list_repo_files("alice/own-card", revision="step-2")


def test_snippet_quotes_any_prompt_as_valid_python():
    import ast

    system = 'Answer in <answer> tags.\nBe "brief", don\'t explain. \\ done'
    card = render_model_card(CardInfo(repo_id="a/m", step=3, revision="step-3", system_prompt=system,
                                      example_question="4 - 1 = ?"))
    [snippet] = re.findall(r"```python\n(.*?)```", card, re.S)
    tree = ast.parse(snippet)  # compiles
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert system in strings and "4 - 1 = ?" in strings


def test_card_without_validation_or_curves_has_no_empty_results_table():
    card = render_model_card(CardInfo(repo_id="a/m", step=3, revision="step-3", metrics={"critic/score/mean": 0.1}))
    assert "## Results" not in card and "![" not in card


def test_metric_log_with_the_current_step_appended(tmp_path):
    log = write_log(tmp_path, RECORDS[:3])
    curves_for_step(log, 3, {"critic/score/mean": 2.0}, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert 3 not in read_metrics(find_metric_logs(tmp_path))  # the log itself is veRL's: never written here


@pytest.mark.parametrize("path", ["tiny://qwen2-warm", "Qwen/Qwen2.5-1.5B", "/home/alice/models/qwen"])
def test_card_names_the_base_model_each_kind_of_model_path_allows(path):
    """A Hub id: metadata + link; the offline demo model: named with what it is (the issue asks the card for the
    base model, and no Hub page can say what tiny://qwen2-warm is); a local path: not named (it names a user's
    folders)."""
    from omegaconf import OmegaConf

    from training.hub_upload import uploader_settings

    cfg = OmegaConf.create({"hf_upload": {"repo_id": "a/m"}, "actor_rollout_ref": {"model": {"path": path}}})
    card = render_model_card(CardInfo(repo_id="a/m", step=3, revision="step-3",
                                      **uploader_settings(cfg)["card_info"]))
    meta = ModelCard(card).data.to_dict()
    if path.startswith("tiny://"):
        [row] = [line for line in card.splitlines() if line.startswith("| base model |")]
        assert "`tiny://qwen2-warm`" in row and "off by one 60%" in row and "training/warm_model.py" in row
        assert "base_model" not in meta  # not a Hub id: the Hub would reject the card's metadata
    elif path.startswith("/"):
        assert "| base model |" not in card and "alice" not in card and "base_model" not in meta
    else:
        assert meta["base_model"] == path
        assert f"| base model | [{path}](https://huggingface.co/{path}) |" in card


def test_a_described_base_model_replaces_the_plain_name_in_one_row():
    """A LoRA run on the demo model knows its base as the cache folder (adapter_config.json): the card shows the
    description instead, once, while the adapter's loading lines keep the folder."""
    from training.hub_upload import tiny_model_description

    card = render_model_card(CardInfo(repo_id="a/m", step=3, revision="step-3", base_model="/cache/tiny-qwen2-abc",
                                      extra={"base model": tiny_model_description("tiny://qwen2")}))
    rows = [line for line in card.splitlines() if line.startswith("| base model |")]
    assert rows == ["| base model | `tiny://qwen2`: this project's offline tiny Qwen2, randomly initialised "
                    "(training/tiny_model.py) |"]
