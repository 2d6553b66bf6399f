"""The FP8 checkpoints `quantize` writes load in stock vLLM 0.32 on CPU (with the ray-calib plugin) and generate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_calib.convert.pipeline import QuantizeRequest, quantize_run
from ray_calib.rundir import RunDir
from tests.convert.synthetic import write_measurements

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("vllm_generate.py")


def quantized(tmp_path: Path, model: Path, fp8_kv: bool) -> Path:
    write_measurements(tmp_path / "run" / "measure", model, world_size=2)
    result = quantize_run(QuantizeRequest(run=RunDir.resolve(tmp_path / "run"), model=model, fp8_kv=fp8_kv,
                                          scale_method="maxabs_pow2", low_cpu_mem=True))
    return result.summary.out


def generate(model: Path, tp: int = 1, kv_dtype: str = "auto") -> tuple[list[int], str]:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(model), str(tp), kv_dtype], capture_output=True,
                          text=True, timeout=600, env=env)
    log = proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("TOKENS")]
    assert proc.returncode == 0 and lines, log[-3000:]
    return eval(lines[-1].removeprefix("TOKENS "), {}), log  # a list of ints we printed ourselves


def test_tiny_deepseek_fp8_loads_and_generates(tmp_path, tiny_deepseek):
    tokens, log = generate(quantized(tmp_path, tiny_deepseek, fp8_kv=True))
    assert len(tokens) == 6
    assert "CompressedTensorsW8A8Fp8" in log or "compressed" in log.lower()


def test_tiny_llama_fp8_with_fp8_kv_scales_tp1_and_tp2(tmp_path, tiny_llama):
    out = quantized(tmp_path, tiny_llama, fp8_kv=True)
    tokens, log = generate(out, tp=1, kv_dtype="fp8")
    assert len(tokens) == 6 and "not loaded" not in log  # vLLM warns "... k_scale is not loaded" on a bad name
    tokens_tp2, log2 = generate(out, tp=2, kv_dtype="fp8")
    assert len(tokens_tp2) == 6 and "not loaded" not in log2
