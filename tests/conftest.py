"""Session fixtures: real FSDP2 checkpoints, written once per test session and shared (see consolidation_checks)."""

import pytest


@pytest.fixture(scope="session")
def fsdp_checkpoints(tmp_path_factory):
    """``fsdp_checkpoints["w3_tied"]`` -> a WrittenCheckpoint; each case is written on first use only."""
    from tests.consolidation_checks import CheckpointCache  # imports torch: only for sessions that use it

    return CheckpointCache(tmp_path_factory.mktemp("fsdp_ckpts"))
