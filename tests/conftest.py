"""Shared pytest set-up: markers and session fixtures for the builtin assets."""
from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes a minute or more (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped automatically without one")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def asset_cache(tmp_path_factory) -> str:
    """A private SKIPGPT_CACHE for this session (the user's cache is left alone; SmolLM2 uses the default)."""
    return str(tmp_path_factory.mktemp("skipgpt-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(asset_cache) -> str:
    """Folder of builtin:tiny prepared in the session cache. Pass this path (not builtin:tiny) to subprocesses."""
    from skipgpt_dist.assets import prepare_tiny

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SKIPGPT_CACHE", asset_cache)
        return prepare_tiny()


@pytest.fixture(scope="session")
def shakespeare_eval_files() -> list[str]:
    """Text files of the eval plays (Hamlet, Macbeth, The Tempest)."""
    from skipgpt_dist.assets import shakespeare_files

    return shakespeare_files("eval")
