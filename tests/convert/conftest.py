"""Tiny random-weight models (built once per session) and their synthetic vLLM-named measurements."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llama(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_deepseek(tiny_model):
    return tiny_model("deepseek_v3")
