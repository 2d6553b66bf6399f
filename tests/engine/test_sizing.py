"""TP sizes, device counts, context lengths and the memory-driven TP default, checked before any process starts."""

from __future__ import annotations

import json
import os

import pytest

from ray_calib.engine import sizing
from ray_calib.engine.device import GiB
from ray_calib.engine.memory import (
    CPU_FIXED_PSS_MIB,
    MemoryCheck,
    MiB,
    cpu_worker_bytes,
    expert_w13_bytes,
    memory_check,
)
from ray_calib.errors import ConfigError, EngineError
from ray_calib.testing.tiny.model import CONFIGS

R1 = {
    "num_attention_heads": 128,
    "n_routed_experts": 256,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "max_position_embeddings": 163840,
}


def test_deepseek_r1_and_its_tiny_stand_in_allow_tp_16():
    assert 16 in sizing.valid_tp_sizes(sizing.ModelShape.from_config(R1))
    tiny = sizing.ModelShape.from_config(CONFIGS["deepseek_r1"])
    assert sizing.valid_tp_sizes(tiny) == [1, 2, 4, 8, 16]
    sizing.check_tp(tiny, 16, "tiny")


@pytest.mark.parametrize(
    "config,number,what",
    [
        ({**R1, "num_attention_heads": 24}, "24 attention heads", "24 % 16 = 8"),
        ({**R1, "n_routed_experts": 8}, "8 routed experts", "8 % 16 = 8"),
        ({**R1, "moe_intermediate_size": 1400}, "1400 moe_intermediate_size", "1400 % 16 = 8"),
    ],
)
def test_tp_16_that_does_not_divide_names_the_number_and_the_tps_that_would(config, number, what):
    with pytest.raises(ConfigError) as err:
        sizing.check_tp(sizing.ModelShape.from_config(config), 16, "org/model")
    message = str(err.value)
    assert f"--tp 16 does not divide the {number} of org/model ({what})" in message
    assert "use --tp 1 | 2 | 4 | 8" in message and "\n" not in message


def test_a_cluster_with_fewer_devices_than_the_tp_is_refused_naming_the_tps_that_fit():
    shape = sizing.ModelShape.from_config(R1)
    with pytest.raises(
        EngineError,
        match=r"--tp 16 needs 16 devices but the Ray cluster offers 8; "
        r"use --tp 1 \| 2 \| 4 \| 8, or add nodes",
    ):
        sizing.check_device_count(shape, 16, 8, "the Ray cluster")
    sizing.check_device_count(shape, 16, 16, "the Ray cluster")


def test_max_model_len_beyond_the_models_context_is_refused_with_both_numbers():
    shape = sizing.ModelShape.from_config(CONFIGS["deepseek_r1"])
    with pytest.raises(
        ConfigError,
        match=r"--max-model-len 4096 is beyond the 1024-token context of m .*"
        r"pass --max-model-len 1024 or less",
    ):
        sizing.check_max_model_len(shape, 4096, "m")
    sizing.check_max_model_len(shape, 1024, "m")
    sizing.check_max_model_len(shape, None, "m")


def _weights(tmp_path, nbytes: int):
    header = json.dumps({"w": {"dtype": "BF16", "shape": [nbytes // 2], "data_offsets": [0, nbytes]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    os.truncate(path, 8 + len(header) + nbytes)  # sparse
    return tmp_path


def test_cpu_need_is_built_from_the_measured_worker_memory(tmp_path):
    check = MemoryCheck(
        _weights(tmp_path, 2 * GiB),
        [1, 2, 4, 8, 16],
        device="cpu",
        device_bytes=64 * GiB,
        kv_bytes=GiB // 4,
        devices_per_node=None,
    )
    plan = check.plan(8)
    assert plan.need_per_rank == 2 * GiB // 8 + GiB // 4 + cpu_worker_bytes(8) + CPU_FIXED_PSS_MIB * MiB // 8
    assert plan.budget_per_rank == 64 * GiB // 8
    assert cpu_worker_bytes(3) == cpu_worker_bytes(4) and cpu_worker_bytes(64) == cpu_worker_bytes(16)


def test_default_tp_is_the_preferred_one_when_it_fits_else_the_smallest_that_fits(tmp_path):
    shape = sizing.ModelShape.from_config(R1)
    check = MemoryCheck(
        _weights(tmp_path, 40 * GiB),
        sizing.valid_tp_sizes(shape),
        device="cuda",
        device_bytes=14 * GiB,
        kv_bytes=0,
        devices_per_node=None,
    )
    eight = sizing.Devices(8, "this node")
    assert sizing.choose_tp(shape, None, model_id="m", devices=eight, memory=check) == 4
    assert sizing.choose_tp(shape, None, model_id="m", devices=eight, memory=check, preferred=8) == 8
    assert sizing.choose_tp(shape, None, model_id="m", devices=eight, memory=check, preferred=2) == 4
    with pytest.raises(EngineError, match=r"TP 2 needs .* use --tp 4"):
        sizing.choose_tp(shape, 2, model_id="m", devices=eight, memory=check)
    with pytest.raises(EngineError, match="no TP this model allows fits here"):
        sizing.choose_tp(shape, None, model_id="m", devices=sizing.Devices(2, "this node"), memory=check)


def _moe_weights(tmp_path, expert_bytes: int, other_bytes: int):
    tensors, offset = {}, 0
    for name, nbytes in (
        ("model.layers.1.mlp.experts.0.gate_proj.weight", expert_bytes),
        ("model.layers.1.mlp.experts.0.up_proj.weight", expert_bytes),
        ("model.layers.1.mlp.experts.0.down_proj.weight", expert_bytes),
        ("model.layers.1.mlp.gate.weight", other_bytes),
    ):
        tensors[name] = {"dtype": "BF16", "shape": [nbytes // 2], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps(tensors).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    os.truncate(path, 8 + len(header) + offset)
    return tmp_path


def test_a_cpu_measurement_counts_the_held_copy_of_the_experts_w13(tmp_path, monkeypatch):
    """The observers keep the unpacked W13 while vLLM's CPU MoE kernel repacks it: measure needs that twice."""
    model = _moe_weights(tmp_path, GiB, MiB)
    assert expert_w13_bytes(model) == 2 * GiB
    monkeypatch.setattr("ray_calib.engine.memory.device_memory_bytes", lambda device: 64 * GiB)
    serve = memory_check(model, [1, 2], "cpu", 0.25)
    measure = memory_check(model, [1, 2], "cpu", 0.25, measure=True)
    assert measure.plan(2).need_per_rank - serve.plan(2).need_per_rank == 2 * GiB // 2
    assert memory_check(model, [1, 2], "cuda", 0.25, measure=True).held == 0  # kept in place there: no copy
    dense = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128}
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text(json.dumps(dense))
    assert expert_w13_bytes(tmp_path / "dense") == 0
    r1 = tmp_path / "r1"
    r1.mkdir()
    (r1 / "config.json").write_text(
        json.dumps({**R1, "hidden_size": 7168, "num_hidden_layers": 61, "first_k_dense_replace": 3})
    )
    assert expert_w13_bytes(r1) == 2 * 58 * 256 * 2 * 7168 * 2048  # bf16 gate+up of every routed expert
