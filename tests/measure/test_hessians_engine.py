"""`measure --hessians` in real vLLM runs of the tiny Llama, and what `quantize` does with them.

TP2 against TP1: a column-parallel layer's input is whole on every rank, so both ranks record the same
H and it equals TP1's; a row-parallel layer's ranks record the diagonal blocks of TP1's H. TP1 and TP2
inputs differ only by bf16 rounding of the all-reduced partial sums: each element by at most one bf16
spacing (2^-8 relative) per all-reduce upstream plus one for the layer's own output, and H = sum x xᵀ
doubles a relative error. The 4 chunks per run are summed across checkpoints.

The tiny DeepSeek: each routed expert's H comes from the tokens routed to it. Every token goes to top_k
experts and, whole, to the shared expert, so the experts' W13 hessians sum to top_k x the shared expert's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ray_calib.measurements import hessians
from tests.measure.conftest import REPO, measure_env

BF16_SPACING = 2.0**-8


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tolerance(node: str) -> float:
    """2 x (all-reduces before this layer's input + 1) bf16 spacings; two all-reduces per decoder layer."""
    layer = int(node.split(".layers.")[1].split(".")[0])
    upstream = 2 * layer + (1 if node.endswith(("gate_up_proj", "down_proj")) else 0)
    return 2 * (upstream + 1) * BF16_SPACING


@pytest.fixture(scope="module")
def tp1_tp2(measured):
    """The runs test_measure_runs.py checks: a model this small records hessians unasked (--fp8-kv only adds
    the K/V observers; the engine's cache and every linear input are the same)."""
    return measured("llama", 1, False), measured("llama", 2, True)


def test_tp2_ranks_hold_tp1s_hessian_blocks(tp1_tp2):
    one_run, two_run = tp1_tp2
    one = hessians.load_model_hessians(one_run.out)
    ranks = [hessians.read(p) for p in hessians.rank_files(two_run.out)]
    assert one is not None and len(ranks) == 2 and one.tokens == ranks[0].tokens > 0
    assert set(one.matrices) == set(ranks[0].matrices) and len(one.matrices) >= 4
    assert ranks[0].sharded == {n for n in one.matrices if n.endswith(("o_proj", "down_proj"))}
    worst = {}
    for node, whole in one.matrices.items():
        if node in ranks[0].sharded:
            half = whole.shape[0] // 2
            assert ranks[0].matrices[node].shape == (half, half)
            blocks = [
                (r.matrices[node], whole[i * half : (i + 1) * half, i * half : (i + 1) * half])
                for i, r in enumerate(ranks)
            ]
        else:
            np.testing.assert_array_equal(ranks[0].matrices[node], ranks[1].matrices[node])  # one input, two ranks
            blocks = [(ranks[0].matrices[node], whole)]
        worst[node] = max(relative(got, want) for got, want in blocks)
        assert worst[node] <= tolerance(node), (node, worst[node], tolerance(node))
    print("worst relative difference per node:", json.dumps(worst, indent=1))


def test_a_small_model_records_hessians_by_default(measured):
    """The tiny model's hessians are far below the per-rank budget: measure records them unasked (`--no-hessians`
    opting out is checked on the cluster test's run, tests/cluster/test_up.py)."""
    assert len(hessians.rank_files(measured("llama", 2, True).out)) == 2


def quantize(model, measurements, out, *flags):
    command = [sys.executable, "-m", "ray_calib.cli", "quantize", "--model", str(model)]
    command += ["--measurements", str(measurements), "--out", str(out), *flags]
    done = subprocess.run(command, cwd=REPO, env=measure_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


MEMBERS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def test_quantize_rounds_with_gptq_and_lowers_each_layers_output_error(tp1_tp2, tiny_models, tmp_path):
    """Error on the calibration inputs, tr((W - Q) H (W - Q)ᵀ), per weight: GPTQ's against round to nearest."""
    import torch
    from safetensors.torch import load_file

    one_run, _ = tp1_tp2
    model = tiny_models["llama"]
    assert "GPTQ rounding" in quantize(model, one_run.out, tmp_path / "gptq")
    assert "GPTQ rounding" not in quantize(model, one_run.out, tmp_path / "nearest", "--no-gptq")
    source = load_file(str(model / "model.safetensors"))
    gptq, nearest = (load_file(str(tmp_path / kind / "model.safetensors")) for kind in ("gptq", "nearest"))
    ratios = {}
    for node, matrix in hessians.load_model_hessians(one_run.out).matrices.items():
        prefix, kind = node.rsplit(".", 1)
        h = torch.from_numpy(matrix).double()
        for member in MEMBERS.get(kind, (kind,)):
            name = f"{prefix}.{member}"
            weight = source[f"{name}.weight"].double()
            errors = []
            for quantized in (gptq, nearest):
                delta = weight - quantized[f"{name}.weight"].double() * quantized[f"{name}.weight_scale"].double()
                errors.append(float(torch.einsum("ij,jk,ik->", delta, h, delta)))
            ratios[name] = errors[0] / errors[1]
    assert len(ratios) >= 7 and all(r < 1.0 for r in ratios.values()), ratios
    assert np.mean(list(ratios.values())) < 0.8, ratios


@pytest.fixture(scope="module")
def deepseek_run(measured):
    """The TP1 BF16-KV run test_measure_runs.py checks."""
    return measured("deepseek_v3", 1, False)


def test_routed_experts_and_kv_b_proj_get_hessians_from_their_own_inputs(deepseek_run, tiny_models):
    config = json.loads((tiny_models["deepseek_v3"] / "config.json").read_text())
    top_k, experts = config["num_experts_per_tok"], config["n_routed_experts"]
    found = hessians.load_model_hessians(deepseek_run.out)
    assert found is not None
    matrices = found.matrices
    moe_layers = range(config["first_k_dense_replace"], config["num_hidden_layers"])
    for layer in moe_layers:
        op = f"model.layers.{layer}.mlp.experts"
        routed = [matrices[f"{op}.w13_list.{k}"] for k in range(experts) if f"{op}.w13_list.{k}" in matrices]
        assert len(routed) >= experts // 2, f"layer {layer}: only {len(routed)} experts got tokens"
        assert all(f"{op}.w2_list.{k}" in matrices for k in range(experts) if f"{op}.w13_list.{k}" in matrices)
        shared = matrices[f"model.layers.{layer}.mlp.shared_experts.gate_up_proj"].astype(np.float64)
        assert relative(sum(h.astype(np.float64) for h in routed), top_k * shared) < 1e-5
        assert matrices[f"{op}.w2_list.0"].shape == (config["moe_intermediate_size"],) * 2
    for layer in range(config["num_hidden_layers"]):
        latent = matrices[f"model.layers.{layer}.self_attn.kv_b_proj"]
        assert latent.shape == (config["kv_lora_rank"],) * 2 and np.trace(latent) > 0


EXPERT_MEMBERS = {"w13_list": ("gate_proj", "up_proj"), "w2_list": ("down_proj",)}


def test_quantize_rounds_experts_and_kv_b_proj_with_gptq(deepseek_run, tiny_models, tmp_path):
    """Output error tr((W - Q) H (W - Q)ᵀ) on the calibration inputs: the checkpoint's weights against round to
    nearest at the same scale, for every routed expert and kv_b_proj (GPTQ for these used to be skipped)."""
    import torch
    from safetensors.torch import load_file

    from ray_calib.convert.cast import cast_to_fp8

    model = tiny_models["deepseek_v3"]
    quantize(model, deepseek_run.out, tmp_path / "fp8")
    source, fp8 = load_file(str(model / "model.safetensors")), load_file(str(tmp_path / "fp8" / "model.safetensors"))
    ratios = {}
    for node, matrix in hessians.load_model_hessians(deepseek_run.out).matrices.items():
        if ".experts.w" in node:
            op, kind, expert = node.rsplit(".", 2)
            names = [f"{op}.{expert}.{member}" for member in EXPERT_MEMBERS[kind]]
        elif node.endswith("kv_b_proj"):
            names = [node]
        else:
            continue
        h = torch.from_numpy(matrix).double()
        for name in names:
            weight, scale = source[f"{name}.weight"].double(), fp8[f"{name}.weight_scale"]
            nearest = cast_to_fp8(source[f"{name}.weight"], scale).double() * scale.double()
            errors = [weight - fp8[f"{name}.weight"].double() * scale.double(), weight - nearest]
            ratios[name] = float(torch.einsum("ij,jk,ik->", errors[0], h, errors[0])) / float(
                torch.einsum("ij,jk,ik->", errors[1], h, errors[1])
            )
    assert len(ratios) >= 40 and all(r < 1.0 for r in ratios.values()), ratios
    assert np.mean(list(ratios.values())) < 0.8, ratios


def test_tp2_expert_w2_hessians_are_each_ranks_slice_of_the_intermediate(measured, tiny_models):
    """At TP2 each rank holds half of every expert's intermediate: W2's H is sharded (block diagonal once
    merged) and W13's, over the whole hidden state, is the same on both ranks."""
    config = json.loads((tiny_models["deepseek_v3"] / "config.json").read_text())
    ranks = [hessians.read(p) for p in hessians.rank_files(measured("deepseek_v3", 2, True).out)]
    w2 = sorted(n for n in ranks[0].matrices if ".w2_list." in n)
    assert w2 and set(w2) <= ranks[0].sharded
    half = config["moe_intermediate_size"] // 2
    assert all(ranks[0].matrices[n].shape == (half, half) for n in w2)
    merged = hessians.merge_ranks(ranks)
    assert merged.matrices[w2[0]].shape == (2 * half, 2 * half)
    w13 = next(n for n in ranks[0].matrices if ".w13_list." in n)
    np.testing.assert_array_equal(ranks[0].matrices[w13], ranks[1].matrices[w13])
