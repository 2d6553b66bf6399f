"""Tiny models, a calibration set, and `ray-calib measure` runs shared by the measure tests.

Each run is a real `ray-calib measure` subprocess (real vLLM on CPU); runs are cached per session so
one vLLM start serves many asserts. Prefill-only runs (max_new_tokens=1) are what the re-shard
invariant compares (DESIGN §4).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NUM_PROMPTS = 8
CHUNK = 2  # prompts per checkpoint (and per batch): 4 chunks per run, so a run can be killed mid-way


def measure_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VLLM_"))}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", RAY_CALIB_DEVICE="cpu", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def measure_args(model: Path, dataset: Path, out: Path, tp: int, *, fp8_kv: bool, new_tokens: int = 1,
                 extra: tuple[str, ...] = ()) -> list[str]:
    args = [sys.executable, "-m", "ray_calib.cli", "measure", "-m", str(model), "-d", str(dataset), "-t", str(tp),
            "-n", str(NUM_PROMPTS), "-l", "24", "-b", str(CHUNK), "--chunk-size", str(CHUNK),
            "--max-new-tokens", str(new_tokens), "-o", str(out), *extra]
    return args + (["--fp8-kv"] if fp8_kv else [])


@dataclass
class Run:
    out: Path
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> Run:
        assert self.returncode == 0, f"measure failed ({self.returncode}):\n{self.stderr[-3000:]}"
        return self


def run_measure(args: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> Run:
    proc = subprocess.run(args, cwd=REPO, env=env or measure_env(), capture_output=True, text=True, timeout=timeout)
    out = Path(args[args.index("-o") + 1])
    return Run(out=out, returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from ray_calib.tiny.model import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny_model(arch, root / arch).path for arch in ("llama", "deepseek_v3")}


@pytest.fixture(scope="session")
def calib_set(tmp_path_factory) -> Path:
    from ray_calib.tiny.calibset import make_calib_set

    return make_calib_set("pile", tmp_path_factory.mktemp("calib") / "pile.jsonl", num_samples=32)


@pytest.fixture(scope="session")
def measured(tiny_models, calib_set, tmp_path_factory):
    """`measured(arch, tp, fp8_kv)` -> the finished Run, started once per session."""
    cache: dict[tuple, Run] = {}
    root = tmp_path_factory.mktemp("measure-runs")

    def get(arch: str, tp: int, fp8_kv: bool) -> Run:
        key = (arch, tp, fp8_kv)
        if key not in cache:
            out = root / f"{arch}-tp{tp}-{'fp8kv' if fp8_kv else 'bf16kv'}"
            cache[key] = run_measure(measure_args(tiny_models[arch], calib_set, out, tp, fp8_kv=fp8_kv)).check()
        return cache[key]

    return get
