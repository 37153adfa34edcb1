"""Fixtures shared by the torch-zone unit tests (opted into per file with
``pytestmark = pytest.mark.usefixtures(...)``)."""

from __future__ import annotations

import pytest

from tests.unit.torch_fakes import model_cache_dir, single_torch_thread


@pytest.fixture
def recipe_settings(monkeypatch):
    """Recipes read core.settings: model cache under the shared test data dir,
    checkpoints every 2 steps."""
    from core.settings import get_settings

    monkeypatch.setenv("DPC_DATA_DIR", str(model_cache_dir().parent))
    monkeypatch.setenv("DPC_CHECKPOINT_EVERY_STEPS", "2")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def one_torch_thread():
    yield from single_torch_thread()
