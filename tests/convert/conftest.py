"""Tiny random-weight models (built once per session) and their synthetic vLLM-named measurements."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llama(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_deepseek(tiny_model):
    return tiny_model("deepseek_v3")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as BF16 safetensors (`ray-calib import-gguf`, built once into the cache)."""
    from ray_calib.realmodel import smollm2 as real

    return real.model_dir()[0]
