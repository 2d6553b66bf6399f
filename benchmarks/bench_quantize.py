"""Benchmark `ray-calib quantize`: wall time vs `cp -r` + sync of the same checkpoint, peak RSS with and
without --low-cpu-mem, at two checkpoint sizes (the low-cpu-mem peak must not grow with the size).

    python benchmarks/bench_quantize.py [--sizes-gb 0.5 2.0] [--repeat 3] [--tmp DIR]

Each run is its own child process, so its peak RSS (ru_maxrss) is its own. The box is shared: every
measurement is repeated and the fastest run reported, with the load average at the time.
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

REPO = Path(__file__).resolve().parents[1]
HIDDEN, INTER = 2048, 5632  # Llama-ish layer: largest tensor 2048 x 5632 bf16 = 23 MB


def make_checkpoint(path: Path, size_gb: float) -> int:
    """A Llama-shaped BF16 checkpoint of about `size_gb`, 2 layers per shard; returns the largest tensor's bytes."""
    import torch
    from safetensors.torch import save_file

    layer_bytes = 2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER)
    layers = max(2, round(size_gb * 1e9 / layer_bytes))
    path.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": 256, "torch_dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
              "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
              "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}
    for first in range(0, layers, 2):
        tensors = {}
        for layer in range(first, min(first + 2, layers)):
            for name, shape in shapes.items():
                tensors[f"model.layers.{layer}.{name}.weight"] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        save_file(tensors, str(path / f"model-{first // 2:05d}.safetensors"), metadata={"format": "pt"})
    return 2 * HIDDEN * INTER


def bench(size_gb: float, tmp: Path, repeat: int) -> dict:
    model, meas = tmp / f"bf16-{size_gb}", tmp / f"meas-{size_gb}"
    largest = make_checkpoint(model, size_gb)
    sys.path.insert(0, str(REPO))
    from tests.convert.synthetic import write_measurements

    write_measurements(meas, model, world_size=1)
    nbytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    subprocess.run(["sync"], check=True)
    copies = []
    for _ in range(repeat):
        copies.append(run_child(["sh", "-c", f"cp -r {model} {tmp}/copy && sync"])[0])
        shutil.rmtree(tmp / "copy")
        subprocess.run(["sync"], check=True)
    copy_wall = min(copies)
    result = {"size_gb": nbytes / 1e9, "largest_tensor_mb": largest / 1e6, "copy_s": copy_wall, "load": load_average()}
    for mode in ("default", "low_cpu_mem"):
        out = tmp / f"fp8-{size_gb}-{mode}"
        args = [sys.executable, "-m", "ray_calib.cli", "quantize", "--model", str(model), "--measurements", str(meas),
                "--out", str(out), "--scale-method", "maxabs_pow2"] + (["--low-cpu-mem"] if mode != "default" else [])
        runs = []
        for _ in range(repeat):
            runs.append(run_child(["sh", "-c", " ".join(args) + " && sync"]))
            shutil.rmtree(out)
            subprocess.run(["sync"], check=True)
        wall, _, stdout = min(runs)
        stages = _stages(stdout)
        result[mode] = {"wall_s": wall, "walls": [r[0] for r in runs], "peak_rss_mb": max(r[1] for r in runs),
                        "ratio_vs_copy": wall / copy_wall, "gb_per_s": nbytes / 1e9 / wall, "stages": stages,
                        "other_s": wall - sum(stages.values())}
    shutil.rmtree(model)
    return result


def _stages(stdout: str) -> dict[str, float]:
    """Stage seconds from quantize's `time: read 0.3 s, amax 0.1 s, ...` line."""
    line = next(l for l in stdout.splitlines() if l.startswith("time: "))
    parts = line.removeprefix("time: ").split(" (total")[0].split(", ")
    return {p.split()[0]: float(p.split()[1]) for p in parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[0.5, 2.0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the fastest is reported")
    parser.add_argument("--tmp", type=Path, default=None)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-quantize-", dir=args.tmp))
    try:
        for size in args.sizes_gb:
            r = bench(size, tmp, args.repeat)
            budget = 3 * r["largest_tensor_mb"] + 300
            print(f"checkpoint {r['size_gb']:.2f} GB (largest tensor {r['largest_tensor_mb']:.0f} MB, load "
                  f"{r['load']:.1f} on {os.cpu_count()} cores): cp -r + sync {r['copy_s']:.2f} s "
                  f"(best of {args.repeat})")
            for mode in ("default", "low_cpu_mem"):
                m = r[mode]
                stages = ", ".join(f"{k} {v:.2f}" for k, v in m["stages"].items())
                print(f"  {mode:12s} {m['wall_s']:6.2f} s  {m['ratio_vs_copy']:.2f}x copy (target <= 2x)  "
                      f"{m['gb_per_s']:.2f} GB/s  peak RSS {m['peak_rss_mb']:.0f} MB  "
                      f"[{stages}, start/imports/sync {m['other_s']:.2f} s]  runs {' '.join(f'{w:.2f}' for w in m['walls'])}")
            print(f"  low-cpu-mem RSS target <= 3 x largest + 300 MB = {budget:.0f} MB: "
                  f"{'met' if r['low_cpu_mem']['peak_rss_mb'] <= budget else 'MISSED'}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
