"""convert-bf16 on a block-FP8 checkpoint built here (128x128 blocks, weight_scale_inv, DeepSeek layout)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from ray_calib.convert.bf16 import MANIFEST, convert_to_bf16  # noqa: E402
from ray_calib.convert.fp8 import as_float32, dequantize_blocks  # noqa: E402
from ray_calib.errors import ModelError  # noqa: E402
from ray_calib.model.safetensors_io import ShardReader, file_sha256  # noqa: E402


def block_fp8_checkpoint(directory, shapes):
    """Weights quantized per 128x128 block like DeepSeek-V3; returns the dequantized reference."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    directory.mkdir()
    reference, weight_map = {}, {}
    for shard_index, shard_shapes in enumerate(shapes):
        shard, tensors = f"model-{shard_index:05d}-of-{len(shapes):05d}.safetensors", {}
        for name, (rows, cols) in shard_shapes.items():
            weight = torch.randn(rows, cols, generator=gen) * 3
            blocks = (-(-rows // 128), -(-cols // 128))
            scale_inv = torch.rand(blocks, generator=gen) * 0.01 + 0.001
            expanded = scale_inv.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
            fp8 = (weight / expanded).clamp(-448, 448).to(torch.float8_e4m3fn)
            tensors[name], tensors[f"{name}_scale_inv"] = fp8, scale_inv
            reference[name] = (fp8.float() * expanded).to(torch.bfloat16)
        tensors[f"model.layers.{shard_index}.input_layernorm.weight"] = torch.ones(64, dtype=torch.bfloat16)
        reference[f"model.layers.{shard_index}.input_layernorm.weight"] = torch.ones(64, dtype=torch.bfloat16)
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(
        json.dumps(
            {
                "model_type": "deepseek_v3",
                "quantization_config": {
                    "quant_method": "fp8",
                    "weight_block_size": [128, 128],
                    "activation_scheme": "dynamic",
                },
            }
        )
    )
    return reference


SHAPES = [
    {"model.layers.0.mlp.down_proj.weight": (256, 384), "model.layers.0.self_attn.kv_b_proj.weight": (200, 130)},
    {"model.layers.1.mlp.experts.0.up_proj.weight": (128, 256)},
]


def test_bf16_equals_dequantized_reference_and_index_drops_scales(tmp_path):
    reference = block_fp8_checkpoint(tmp_path / "fp8", SHAPES)
    summary = convert_to_bf16(tmp_path / "fp8", tmp_path / "bf16")
    assert summary.converted == 3 and len(summary.shards_written) == 2
    out = {}
    for shard in summary.shards_written:
        with ShardReader(tmp_path / "bf16" / shard) as reader:
            out.update({name: reader.read(name) for name in reader.tensors})
    assert set(out) == set(reference)
    for name, expected in reference.items():
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], expected), name
    index = json.loads((tmp_path / "bf16/model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(reference) and not any(k.endswith("scale_inv") for k in index)
    assert "quantization_config" not in json.loads((tmp_path / "bf16/config.json").read_text())


def test_resumable_per_shard(tmp_path):
    block_fp8_checkpoint(tmp_path / "fp8", SHAPES)
    first = convert_to_bf16(tmp_path / "fp8", tmp_path / "bf16")
    shard = first.shards_written[1]
    digest = file_sha256(tmp_path / "bf16" / shard)
    (tmp_path / "bf16" / shard).write_bytes(b"truncated by a crash")
    again = convert_to_bf16(tmp_path / "fp8", tmp_path / "bf16")
    assert again.shards_skipped == first.shards_written[:1] and again.shards_written == [shard]
    assert file_sha256(tmp_path / "bf16" / shard) == digest
    assert json.loads((tmp_path / "bf16" / MANIFEST).read_text())["shards"][shard] == digest


def test_errors(tmp_path, run_cli):
    block_fp8_checkpoint(tmp_path / "fp8", SHAPES)
    result = run_cli("convert-bf16", "--in", tmp_path / "fp8", "--out", tmp_path / "bf16")
    assert result.exit_code == 0 and "3 tensors dequantized" in result.stdout
    result = run_cli("convert-bf16", "--in", tmp_path / "bf16", "--out", tmp_path / "x")
    assert result.exit_code == 1 and "has no FP8 tensors" in result.stderr
    with pytest.raises(ModelError, match="free for the output"):
        convert_to_bf16(tmp_path / "fp8", tmp_path / "y", free_space=lambda p: 0)


def test_dequantize_blocks_handles_edge_blocks():
    import numpy as np

    codes = torch.full((130, 129), 2.0).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    out = dequantize_blocks(
        codes, np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), (128, 128), np.empty((130, 129), np.uint16)
    )
    values = as_float32(out.reshape(-1).view(np.uint8), "BF16").reshape(130, 129)
    assert values[0, 0] == 2 and values[0, 128] == 4 and values[129, 0] == 6 and values[129, 128] == 8


def test_dequantize_blocks_equals_torch_float32_product():
    import numpy as np

    gen = torch.Generator().manual_seed(1)
    weight = (torch.randn(300, 520, generator=gen) * 200).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(3, 5, generator=gen) * 0.01
    expanded = scale_inv.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :520]
    expected = (weight.float() * expanded).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    out = dequantize_blocks(
        weight.view(torch.uint8).numpy(), scale_inv.numpy(), (128, 128), np.empty((300, 520), np.uint16)
    )
    assert np.array_equal(out, expected)
