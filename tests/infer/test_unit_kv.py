"""The candidate without its k/v scales, as `eval` scores it for the scale-1.0 row."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from ray_calib.infer.unit_kv import without_kv_scales
from ray_calib.model.checkpoint import Checkpoint

KV_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def fp8_checkpoint(root, *, mixed: bool):
    """Weights in one shard; k/v scales in their own shard (ours) or beside the weights (mixed)."""
    root.mkdir()
    weights = {"a.weight": torch.ones(4, 4), "a.weight_scale": torch.ones(1)}
    scales = {"l0.self_attn.k_proj.k_scale": torch.full((1,), 0.5), "l0.self_attn.v_proj.v_scale": torch.ones(1)}
    layout = (
        {"model-00001.safetensors": {**weights, **scales}}
        if mixed
        else {
            "model-00001.safetensors": weights,
            "model-kv-scales.safetensors": scales,
        }
    )
    for shard, tensors in layout.items():
        save_file(tensors, str(root / shard), metadata={"format": "pt"})
    weight_map = {name: shard for shard, tensors in layout.items() for name in tensors}
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    quant = {"quant_method": "compressed-tensors", "kv_cache_scheme": KV_SCHEME}
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": quant}))
    (root / "tokenizer.json").write_text("{}")
    return root


def check_copy(copy, source):
    checkpoint = Checkpoint.open(copy)
    assert sorted(checkpoint.tensors) == ["a.weight", "a.weight_scale"]
    config = json.loads((copy / "config.json").read_text())
    assert "kv_cache_scheme" not in config["quantization_config"]
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == ["a.weight", "a.weight_scale"]
    assert (copy / "tokenizer.json").resolve() == (source / "tokenizer.json").resolve()
    assert torch.equal(load_file(str(copy / "model-00001.safetensors"))["a.weight"], torch.ones(4, 4))
    assert "kv_cache_scheme" in json.loads((source / "config.json").read_text())["quantization_config"]


def test_a_kv_scales_shard_is_left_out_and_the_rest_linked(tmp_path):
    source = fp8_checkpoint(tmp_path / "fp8", mixed=False)
    copy = without_kv_scales(source, tmp_path / "unit")
    assert copy is not None
    check_copy(copy, source)
    assert (copy / "model-00001.safetensors").is_symlink() and not (copy / "model-kv-scales.safetensors").exists()


def test_a_shard_mixing_weights_and_kv_scales_is_rewritten_without_them(tmp_path):
    source = fp8_checkpoint(tmp_path / "fp8", mixed=True)
    copy = without_kv_scales(source, tmp_path / "unit")
    assert copy is not None
    check_copy(copy, source)
    assert not (copy / "model-00001.safetensors").is_symlink()
    assert len(load_file(str(source / "model-00001.safetensors"))) == 4


def test_a_checkpoint_without_kv_scales_gets_no_copy(tmp_path):
    source = fp8_checkpoint(tmp_path / "fp8", mixed=False)
    (source / "model-kv-scales.safetensors").unlink()
    index = json.loads((source / "model.safetensors.index.json").read_text())
    index["weight_map"] = {n: s for n, s in index["weight_map"].items() if "kv-scales" not in s}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    assert without_kv_scales(source, tmp_path / "unit") is None
    assert not (tmp_path / "unit").exists()
