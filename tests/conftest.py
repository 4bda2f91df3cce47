"""Shared pytest fixtures (append-only: several engineers add fixtures here)."""

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """The offline tiny Qwen2 demo model, built once per test session in a private cache dir."""
    from training.tiny_model import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny-model-cache"))
