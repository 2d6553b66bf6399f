"""Benchmark `ray-calib convert-bf16` against a straightforward whole-shard conversion.

    python benchmarks/bench_convert_bf16.py [--size-mb 300] [--repeat 3] [--tmp DIR]

Builds a DeepSeek-style block-FP8 checkpoint (128x128 blocks, float32 `weight_scale_inv`, ~100 MB
shards of 7168x2048 / 2048x7168 expert weights). The baseline is what one would write first:
`safetensors.torch.load_file` the whole shard, dequantize each weight with an expanded float32 scale,
`save_file` the shard, write the index. Each run is a child process (its own ru_maxrss), timed
until `sync` returns; the fastest of `--repeat` runs is reported with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _child import load_average, run_child  # benchmarks/ is on sys.path when run as a script

SHAPES = ((7168, 2048), (2048, 7168))  # DeepSeek-V3 expert gate/up and down
BASELINE = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file

src, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir()
weight_map = {}
for shard in sorted(p.name for p in src.glob("*.safetensors")):
    tensors = load_file(src / shard)
    result = {}
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            rows, cols = tensor.shape
            scale = tensors[name + "_scale_inv"]
            expanded = scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
            tensor = (tensor.float() * expanded).to(torch.bfloat16)
        result[name] = tensor
    save_file(result, str(out / shard), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(result, shard))
(out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
"""


def make_checkpoint(path: Path, size_mb: float) -> int:
    """Block-FP8 checkpoint of about `size_mb` of FP8 weights in ~100 MB shards; returns the FP8 bytes."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    per_tensor = SHAPES[0][0] * SHAPES[0][1]
    count = max(2, round(size_mb * 1e6 / per_tensor))
    weight_map, shard, tensors, total = {}, 0, {}, 0
    for index in range(count):
        rows, cols = SHAPES[index % 2]
        name = f"model.layers.{index // 3}.mlp.experts.{index % 3}.proj{index}.weight"
        weight = torch.randn(rows, cols, generator=gen)
        scale_inv = torch.rand(-(-rows // 128), -(-cols // 128), generator=gen) * 0.01 + 0.001
        expanded = scale_inv.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
        tensors[name] = (weight / expanded).clamp(-448, 448).to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = scale_inv
        tensors[f"model.layers.{index}.input_layernorm.weight"] = torch.ones(cols, dtype=torch.bfloat16)
        total += rows * cols
        if len(tensors) >= 21 or index == count - 1:  # 7 weights (~100 MB) per shard
            name_of = f"model-{shard:05d}.safetensors"
            save_file(tensors, str(path / name_of), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name_of))
            shard, tensors = shard + 1, {}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(
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
    return total


def best(args: list[str], out: Path, repeat: int) -> tuple[float, float, list[float]]:
    runs = []
    for _ in range(repeat):
        runs.append(run_child(["sh", "-c", " ".join(args) + " && sync"])[:2])
        shutil.rmtree(out)
        subprocess.run(["sync"], check=True)
    return min(r[0] for r in runs), max(r[1] for r in runs), [r[0] for r in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tmp", type=Path, default=None)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-convert-bf16-", dir=args.tmp))
    try:
        src = tmp / "fp8"
        fp8_bytes = make_checkpoint(src, args.size_mb)
        (tmp / "baseline.py").write_text(BASELINE)
        subprocess.run(["sync"], check=True)
        load = load_average()
        base = best([sys.executable, str(tmp / "baseline.py"), str(src), str(tmp / "out")], tmp / "out", args.repeat)
        ours = best(
            [sys.executable, "-m", "ray_calib.cli", "convert-bf16", "--in", str(src), "--out", str(tmp / "out")],
            tmp / "out",
            args.repeat,
        )
        print(
            f"block-FP8 checkpoint: {fp8_bytes / 1e6:.0f} MB FP8 -> {2 * fp8_bytes / 1e6:.0f} MB BF16, "
            f"{len(list(src.glob('*.safetensors')))} shards (load {load:.1f} on {os.cpu_count()} cores, "
            f"best of {args.repeat})"
        )
        for label, (wall, peak, walls) in (("whole-shard baseline", base), ("ray-calib convert-bf16", ours)):
            print(
                f"  {label:22s} {wall:6.2f} s  {fp8_bytes / 1e9 / wall:.2f} GB/s FP8 in  peak RSS {peak:5.0f} MB  "
                f"runs {' '.join(f'{w:.2f}' for w in walls)}"
            )
        speedup, rss = base[0] / ours[0], ours[1] / base[1]
        print(
            f"  speed-up {speedup:.2f}x (target >= 2x: {'met' if speedup >= 2 else 'MISSED'}), "
            f"RSS {rss:.2f}x of baseline (target <= 0.5x: {'met' if rss <= 0.5 else 'MISSED'})"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
