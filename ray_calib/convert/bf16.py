"""`ray-calib convert-bf16`: DeepSeek's block-FP8 checkpoints (128x128 blocks, `weight_scale_inv`) -> BF16.

Calibration needs the BF16 model; DeepSeek ships FP8 weights whose scale_inv holds one float per
128x128 block: `bf16 = fp8 * scale_inv[i // 128, j // 128]`. Streams one tensor at a time (a weight
and its small scale), writes shard i to shard i without the scale entries, resumable per shard
by checksum like `quantize`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ray_calib import atomic
from ray_calib.convert.checkpoint import Checkpoint, FreeSpace, check_free_space, copy_side_files, free_bytes, write_index
from ray_calib.convert.safetensors_io import PlannedTensor, ShardReader, ShardWriter, file_sha256
from ray_calib.errors import ModelError, OutputExistsError

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
        raise ModelError(f"{src}: has no FP8 tensors; it is already BF16/FP16",
                         fix="use it as it is (e.g. ray-calib measure --model " + str(src) + ").")
    missing = sorted(n for n in fp8 if n + SCALE_SUFFIX not in checkpoint.tensors)
    if missing:
        raise ModelError(f"{src}: FP8 tensor '{missing[0]}' has no '{missing[0]}{SCALE_SUFFIX}' ({len(missing)} such)",
                         fix="only DeepSeek-style block FP8 (weight_scale_inv) is supported.")
    layouts = {shard: [PlannedTensor(i.name, "BF16" if i.name in fp8 else i.dtype, i.shape)
                       for i in checkpoint.tensors_in(shard) if not i.name.endswith(SCALE_SUFFIX)]
               for shard in checkpoint.shards}
    manifest = _manifest(out, src, checkpoint, force)
    done = {s for s, digest in manifest["shards"].items() if (out / s).exists() and file_sha256(out / s) == digest}
    check_free_space(out, sum(t.nbytes for s, lay in layouts.items() if s not in done for t in lay), free_space)
    out.mkdir(parents=True, exist_ok=True)
    summary = Bf16Summary(out=out, converted=len(fp8))
    block = tuple((checkpoint.config.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
    for shard, layout in layouts.items():
        if shard in done:
            summary.shards_skipped.append(shard)
            continue
        manifest["shards"][shard] = _convert_shard(checkpoint, out / shard, layout, fp8, block)
        atomic.write_json(out / MANIFEST, manifest)
        summary.shards_written.append(shard)
    copy_side_files(src, out)
    config = {k: v for k, v in checkpoint.config.items() if k != "quantization_config"}
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    atomic.write_json(out / "config.json", config)
    write_index(out, {t.name: s for s, lay in layouts.items() for t in lay}, sum(t.nbytes for lay in layouts.values() for t in lay))
    summary.output_bytes = sum((out / s).stat().st_size for s in layouts)
    return summary


def _manifest(out: Path, src: Path, checkpoint: Checkpoint, force: bool) -> dict:
    key = f"{src.absolute()}:" + ",".join(f"{s}:{(src / s).stat().st_size}" for s in checkpoint.shards)
    path = out / MANIFEST
    if path.exists():
        manifest = json.loads(path.read_text())
        if manifest.get("source") == key or force:
            return manifest if manifest.get("source") == key else {"source": key, "shards": {}}
        raise OutputExistsError(f"{out}: holds a conversion of another checkpoint", fix="pass --force or another --out.")
    if out.exists() and any(out.glob("*.safetensors")) and not force:
        raise OutputExistsError(f"{out}: already holds safetensors files", fix="pass --force or choose another --out.")
    return {"source": key, "shards": {}}


def _convert_shard(checkpoint: Checkpoint, out_path: Path, layout: list[PlannedTensor], fp8: set[str],
                   block: tuple[int, int]) -> str:
    readers: dict[str, ShardReader] = {}

    def read(name: str):
        owner = checkpoint.shard_of[name]
        reader = readers.setdefault(owner, ShardReader(checkpoint.path / owner))
        return reader.read(name)

    try:
        with ShardWriter(out_path, layout) as writer:
            for item in layout:
                tensor = read(item.name)
                if item.name in fp8:
                    tensor = dequantize_blocks(tensor, read(item.name + SCALE_SUFFIX), block)
                writer.write(item.name, tensor)
                del tensor
            return writer.close()
    finally:
        for reader in readers.values():
            reader.__exit__(None)


def dequantize_blocks(weight, scale_inv, block: tuple[int, int] = (128, 128)):
    """BF16 from FP8 `weight` [M, N] and per-block `scale_inv` [ceil(M/bm), ceil(N/bn)] (edge blocks cropped)."""
    import torch

    rows, cols = weight.shape
    block_m, block_n = block
    out = torch.empty((rows, cols), dtype=torch.bfloat16)
    for start in range(0, rows, block_m):  # one block row at a time: float32 scratch of block_m x N
        stop = min(start + block_m, rows)
        scale = scale_inv[start // block_m].to(torch.float32).repeat_interleave(block_n)[:cols]
        out[start:stop] = (weight[start:stop].to(torch.float32) * scale).to(torch.bfloat16)
    return out
