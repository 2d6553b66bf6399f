"""`ray-calib convert-bf16`: DeepSeek's block-FP8 checkpoints (128x128 blocks, `weight_scale_inv`) -> BF16.

Calibration needs the BF16 model; DeepSeek ships FP8 weights whose scale_inv holds one float per
128x128 block: `bf16 = fp8 * scale_inv[i // 128, j // 128]` (float32 product, rounded once, as torch
would). Streams one tensor at a time (a weight and its small scale) through reused buffers, in numpy
(no torch: its import alone is ~1.2 s and ~220 MB here), writes shard i to shard i without the scale
entries, resumable per shard by checksum like `quantize`.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from ray_calib import atomic
from ray_calib.convert import fp8 as codec
from ray_calib.convert.cast import Scratch, stream
from ray_calib.errors import ModelError
from ray_calib.model.checkpoint import (
    Checkpoint,
    FreeSpace,
    check_free_space,
    clear_leftovers,
    copy_side_files,
    free_bytes,
    open_manifest,
    source_fingerprint,
    verified_shards,
    write_index,
)
from ray_calib.model.safetensors_io import PlannedTensor, ShardReader, ShardWriter

MANIFEST = ".ray-calib-bf16.json"
SCALE_SUFFIX = "_scale_inv"


@dataclass
class Bf16Summary:
    out: Path
    shards_written: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)
    converted: int = 0
    output_bytes: int = 0


def convert_to_bf16(src: Path, out: Path, *, force: bool = False, free_space: FreeSpace = free_bytes) -> Bf16Summary:
    checkpoint = Checkpoint.open(src)
    fp8 = {n for n, info in checkpoint.tensors.items() if info.dtype.startswith("F8")}
    if not fp8:
        raise ModelError(
            f"{src}: has no FP8 tensors; it is already BF16/FP16",
            fix="use it as it is (e.g. ray-calib measure --model " + str(src) + ").",
        )
    missing = sorted(n for n in fp8 if n + SCALE_SUFFIX not in checkpoint.tensors)
    if missing:
        raise ModelError(
            f"{src}: FP8 tensor '{missing[0]}' has no '{missing[0]}{SCALE_SUFFIX}' ({len(missing)} such)",
            fix="only DeepSeek-style block FP8 (weight_scale_inv) is supported.",
        )
    layouts = {
        shard: [
            PlannedTensor(i.name, "BF16" if i.name in fp8 else i.dtype, i.shape)
            for i in checkpoint.tensors_in(shard)
            if not i.name.endswith(SCALE_SUFFIX)
        ]
        for shard in checkpoint.shards
    }
    manifest = open_manifest(out, MANIFEST, source_fingerprint(checkpoint), force, "a BF16 conversion")
    done = verified_shards(out, manifest)
    clear_leftovers(out)
    check_free_space(out, sum(t.nbytes for s, lay in layouts.items() if s not in done for t in lay), free_space)
    out.mkdir(parents=True, exist_ok=True)
    summary = Bf16Summary(out=out, converted=len(fp8))
    block = tuple((checkpoint.config.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
    scratch = Scratch(max(i.nbytes for i in checkpoint.tensors.values()), 0, read_ahead=True)
    bf16_out = _empty_bf16(max(checkpoint.tensors[n].numel for n in fp8))
    for shard, layout in layouts.items():
        if shard in done:
            summary.shards_skipped.append(shard)
            continue
        manifest["shards"][shard] = _convert_shard(
            checkpoint, shard, out / shard, layout, fp8, block, scratch, bf16_out
        )
        atomic.write_json(out / MANIFEST, manifest)
        summary.shards_written.append(shard)
    copy_side_files(src, out)
    config = {k: v for k, v in checkpoint.config.items() if k != "quantization_config"}
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    atomic.write_json(out / "config.json", config)
    write_index(
        out,
        {t.name: s for s, lay in layouts.items() for t in lay},
        sum(t.nbytes for lay in layouts.values() for t in lay),
    )
    summary.output_bytes = sum((out / s).stat().st_size for s in layouts)
    return summary


def _empty_bf16(numel: int):
    import numpy as np

    return np.empty(numel, dtype=np.uint16)  # BF16 bits; pages are touched only as far as used


def _convert_shard(
    checkpoint: Checkpoint,
    shard: str,
    out_path: Path,
    layout: list[PlannedTensor],
    fp8: set[str],
    block: tuple[int, int],
    scratch: Scratch,
    bf16_out,
) -> str:
    """Shard i -> shard i: FP8 weights dequantized through `bf16_out`, everything else copied as bytes."""
    import numpy as np

    readers: dict[str, ShardReader] = {}

    def scale_inv(name: str):
        owner = checkpoint.shard_of[name]  # usually this shard, but an index may put it elsewhere
        reader = readers.setdefault(owner, ShardReader(checkpoint.path / owner))
        return codec.as_float32(reader.read_raw(name), checkpoint.tensors[name].dtype)

    try:
        with (
            ShardReader(checkpoint.path / shard) as reader,
            ShardWriter(out_path, layout) as writer,
            closing(stream(reader, [item.name for item in layout], scratch)) as tensors,
        ):
            for name, raw in tensors:
                assert raw is not None, "the scratch takes the largest tensor whole"
                info = checkpoint.tensors[name]
                if name in fp8:
                    out = bf16_out[: info.numel].reshape(info.shape)
                    scales = scale_inv(name + SCALE_SUFFIX).reshape(checkpoint.tensors[name + SCALE_SUFFIX].shape)
                    raw = codec.dequantize_blocks(raw.reshape(info.shape), scales, block, out)
                writer.write_raw(name, np.ascontiguousarray(raw))
            return writer.close()
    finally:
        for reader in readers.values():
            reader.close()
