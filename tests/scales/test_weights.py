"""`scales --weights`: each rank's own shard of the checkpoint (vLLM's TP layout), FP8 dequantized first."""

from __future__ import annotations

import pytest

from ray_calib.errors import ModelError
from ray_calib.scales.weights import Shard, rank_shards

torch = pytest.importorskip("torch")

CONFIG = {"num_attention_heads": 8, "num_key_value_heads": 2, "n_routed_experts": 8}
A = "model.layers.0.self_attn"
M = "model.layers.0.mlp"


class Info:
    def __init__(self, *shape):
        self.shape = shape


TENSORS = {
    f"{A}.q_proj.weight": Info(8 * 16, 128),
    f"{A}.k_proj.weight": Info(2 * 16, 128),
    f"{A}.v_proj.weight": Info(32, 128),
    f"{A}.o_proj.weight": Info(128, 128),
    f"{A}.q_a_proj.weight": Info(64, 128),
    f"{A}.kv_a_proj_with_mqa.weight": Info(80, 128),
    f"{M}.gate_proj.weight": Info(256, 128),
    f"{M}.up_proj.weight": Info(256, 128),
    f"{M}.down_proj.weight": Info(128, 256),
    "lm_head.weight": Info(1000, 128),
    **{f"{M}.experts.{e}.{p}.weight": Info(64, 128) for e in range(8) for p in ("gate_proj", "up_proj")},
    **{f"{M}.experts.{e}.down_proj.weight": Info(128, 64) for e in range(8)},
}


def shards(module: str, rank: int, world: int, local_experts: int = 8, config: dict = CONFIG):
    return rank_shards(module, config, TENSORS, rank, world, local_experts)


def test_vllm_tensor_parallel_layout():
    # QKVParallelLinear: q split, 2 KV heads over 4 ranks -> each head on 2 ranks
    assert shards(f"{A}.qkv_proj", 3, 4) == [
        Shard(f"{A}.q_proj.weight", rows=(96, 128)),
        Shard(f"{A}.k_proj.weight", rows=(16, 32)),
        Shard(f"{A}.v_proj.weight", rows=(16, 32)),
    ]
    assert shards(f"{A}.qkv_proj", 1, 2)[1] == Shard(f"{A}.k_proj.weight", rows=(16, 32))
    assert shards(f"{A}.o_proj", 1, 2) == [Shard(f"{A}.o_proj.weight", cols=(64, 128))]  # row-parallel
    assert shards(f"{M}.gate_up_proj", 1, 2) == [
        Shard(f"{M}.gate_proj.weight", rows=(128, 256)),
        Shard(f"{M}.up_proj.weight", rows=(128, 256)),
    ]
    assert shards(f"{M}.down_proj", 0, 2) == [Shard(f"{M}.down_proj.weight", cols=(0, 128))]
    assert shards(f"{A}.fused_qkv_a_proj", 1, 2) == [
        Shard(f"{A}.q_a_proj.weight"),
        Shard(f"{A}.kv_a_proj_with_mqa.weight"),
    ]  # replicated
    # ParallelLMHead: vocab 1000 padded to 1024, 512 rows per rank, the last one cut at the real vocab
    assert shards("lm_head", 1, 2) == [Shard("lm_head.weight", rows=(512, 1000))]
    assert shards(f"{A}.qkv_proj", 0, 1) == [Shard(f"{A}.{p}.weight") for p in ("q_proj", "k_proj", "v_proj")]
    assert shards(f"{A}.not_in_checkpoint", 0, 2) is None


def test_experts_with_and_without_expert_parallelism():
    # EP: 2 local experts per rank of 4 -> rank 3's expert 1 is global expert 7, whole
    assert shards(f"{M}.experts.w13_list.1", 3, 4, local_experts=2) == [
        Shard(f"{M}.experts.7.gate_proj.weight"),
        Shard(f"{M}.experts.7.up_proj.weight"),
    ]
    # TP experts: every rank holds all 8, w13 rows and w2 columns split
    assert shards(f"{M}.experts.w13_list.5", 1, 2) == [
        Shard(f"{M}.experts.5.gate_proj.weight", rows=(32, 64)),
        Shard(f"{M}.experts.5.up_proj.weight", rows=(32, 64)),
    ]
    assert shards(f"{M}.experts.w2_list.5", 1, 2) == [Shard(f"{M}.experts.5.down_proj.weight", cols=(32, 64))]


def test_a_size_that_does_not_split_is_one_line():
    with pytest.raises(ModelError, match=r"q_proj.weight: dimension 128 does not split over 3 ranks"):
        shards(f"{A}.qkv_proj", 0, 3)


def test_fp8_weights_are_dequantized_first(tmp_path):
    """INC's dequant_original_fp8_weight_if_needed: the scale comes from the BF16 values, not the FP8 codes."""
    from safetensors.torch import save_file

    from ray_calib.inc.devices import DEVICES
    from ray_calib.inc.methods import get_method, scale_from_maxabs
    from ray_calib.scales.weights import CheckpointWeights

    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(256, 192, generator=gen) * 3
    block_scale = torch.tensor([[0.5, 2.0], [0.25, 4.0]])  # 128x128 blocks (the last column block is cropped)
    codes = (dense / block_scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:, :192]).to(torch.float8_e4m3fn)
    save_file(
        {
            "a.weight": codes,
            "a.weight_scale_inv": block_scale,
            "b.weight": (dense / 8).to(torch.float8_e4m3fn),
            "b.weight_scale": torch.tensor(8.0),
        },
        str(tmp_path / "model.safetensors"),
    )
    (tmp_path / "config.json").write_text("{}")
    weights = CheckpointWeights(tmp_path, get_method("maxabs_pow2"), DEVICES["gaudi3"])
    expected = (codes.float() * block_scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:, :192]).to(
        torch.bfloat16
    )
    assert torch.equal(weights.read(Shard("a.weight")), expected)
    assert torch.equal(weights.read(Shard("a.weight", rows=(128, 256), cols=(0, 96))), expected[128:, :96])
    assert torch.equal(
        weights.read(Shard("b.weight")), ((dense / 8).to(torch.float8_e4m3fn).float() * 8).to(torch.bfloat16)
    )
    method = get_method("maxabs_pow2")
    assert weights.weight_scale([Shard("a.weight")]).scale == scale_from_maxabs(
        float(expected.abs().max().float()), method.weight, DEVICES["gaudi3"]
    )
    assert (
        scale_from_maxabs(float(codes.float().abs().max()), method.weight, DEVICES["gaudi3"])
        != weights.weight_scale([Shard("a.weight")]).scale
    )  # the raw codes would give another scale
