"""Tiny random-weight models (built once per session) and their synthetic vLLM-named measurements."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from ray_calib.testing.tiny.model import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama").path


@pytest.fixture(scope="session")
def tiny_deepseek(tmp_path_factory):
    from ray_calib.testing.tiny.model import make_tiny_model

    return make_tiny_model("deepseek_v3", tmp_path_factory.mktemp("tiny") / "deepseek").path
