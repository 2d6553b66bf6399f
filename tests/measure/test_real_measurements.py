"""The whole chain on real measurements: measure (vLLM, TP=2) -> quantize -> vLLM generates."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.convert.test_vllm_load import fp8_tracks_bf16, generate

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VLLM_"))}
    env.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        RAY_CALIB_DEVICE="cpu",
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        VLLM_CPU_KVCACHE_SPACE="1",
        PYTHONUNBUFFERED="1",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ray_calib.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"ray-calib {args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_measured_tiny_llama_quantizes_and_generates(tmp_path, measured, tiny_model):
    """The session's TP=2 measure run of the tiny Llama (FP8 KV, hessians) is the run directory's `measure`."""
    run = tmp_path / "run"
    shutil.copytree(measured("llama", 2, True).out, run / "measure")
    quantized = cli("quantize", "--run-dir", str(run), "--fp8-kv", "--low-cpu-mem", "--scale-method", "maxabs_pow2")
    assert "FP8 tensors" in quantized.stdout and "warning" not in quantized.stderr
    out = run / "fp8"
    scales = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(name.endswith("k_scale") for name in scales)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["kv_cache_scheme"]
    fp8 = generate(out, tp=1, kv_dtype="fp8")
    assert "not loaded" not in fp8.log
    fp8_tracks_bf16(
        fp8, generate(tiny_model("llama"), tp=1, kv_dtype="auto"), generate(tiny_model("llama", seed=1), tp=1)
    )
