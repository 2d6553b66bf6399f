"""Benchmark `ray-calib quantize`: wall time vs `cp -r` + sync of the same checkpoint, peak RSS with and
without --low-cpu-mem, at two checkpoint sizes (the low-cpu-mem peak must not grow with the size).

    python benchmarks/bench_quantize.py [--sizes-gb 0.5 2.0] [--repeat 7] [--tmp DIR]

Each run is its own child process, so its peak RSS (ru_maxrss) is its own. The box is shared: the
copy and the two quantize modes run interleaved, round after round, and each round's ratio is taken
against that round's copy; the median ratio is reported with its spread (min..max over the rounds)
and the load average at the time. Target: low-cpu-mem <= 2.0x the copy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _child import load_average, run_child  # benchmarks/ is on sys.path when run as a script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where `tests` is a package
from tests.convert.synthetic import write_measurements

HIDDEN, INTER = 2048, 5632  # Llama-ish layer: largest tensor 2048 x 5632 bf16 = 23 MB


def make_checkpoint(path: Path, size_gb: float) -> int:
    """A Llama-shaped BF16 checkpoint of about `size_gb`, 2 layers per shard; returns the largest tensor's bytes."""
    import torch
    from safetensors.torch import save_file

    layer_bytes = 2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER)
    layers = max(2, round(size_gb * 1e9 / layer_bytes))
    path.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": 256,
        "torch_dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "self_attn.q_proj": (HIDDEN, HIDDEN),
        "self_attn.k_proj": (HIDDEN, HIDDEN),
        "self_attn.v_proj": (HIDDEN, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (INTER, HIDDEN),
        "mlp.up_proj": (INTER, HIDDEN),
        "mlp.down_proj": (HIDDEN, INTER),
    }
    for first in range(0, layers, 2):
        tensors = {}
        for layer in range(first, min(first + 2, layers)):
            for name, shape in shapes.items():
                tensors[f"model.layers.{layer}.{name}.weight"] = (torch.randn(shape, generator=gen) * 0.02).to(
                    torch.bfloat16
                )
        save_file(tensors, str(path / f"model-{first // 2:05d}.safetensors"), metadata={"format": "pt"})
    return 2 * HIDDEN * INTER


MODES = ("default", "low_cpu_mem")


def bench(size_gb: float, tmp: Path, repeat: int) -> dict:
    model, meas = tmp / f"bf16-{size_gb}", tmp / f"meas-{size_gb}"
    largest = make_checkpoint(model, size_gb)

    write_measurements(meas, model, world_size=1)
    nbytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    subprocess.run(["sync"], check=True)
    copies, copy_cpu, runs = [], [], {mode: [] for mode in MODES}
    for round_ in range(repeat):  # interleaved: each round's figures share the box's state at that time
        copy = run_child(["sh", "-c", f"cp -r {model} {tmp}/copy && sync"], cpu=True)
        copies.append(copy[0])
        copy_cpu.append(copy[3])
        shutil.rmtree(tmp / "copy")
        subprocess.run(["sync"], check=True)
        for mode in MODES if round_ % 2 == 0 else reversed(MODES):  # neither mode always runs first
            out = tmp / f"fp8-{size_gb}-{mode}"
            args = [
                sys.executable,
                "-m",
                "ray_calib.cli",
                "quantize",
                "--model",
                str(model),
                "--measurements",
                str(meas),
                "--out",
                str(out),
                "--scale-method",
                "maxabs_pow2",
            ]
            runs[mode].append(
                run_child(
                    ["sh", "-c", " ".join(args + (["--low-cpu-mem"] if mode != "default" else [])) + " && sync"],
                    cpu=True,
                )
            )
            shutil.rmtree(out)
            subprocess.run(["sync"], check=True)
    result = {
        "size_gb": nbytes / 1e9,
        "largest_tensor_mb": largest / 1e6,
        "copy_s": statistics.median(copies),
        "copies": copies,
        "copy_cpu_s": statistics.median(copy_cpu),
        "load": load_average(),
    }
    for mode in MODES:
        ratios = [run[0] / copy for run, copy in zip(runs[mode], copies)]
        walls = [run[0] for run in runs[mode]]
        stages = {k: statistics.median(_stages(run[2])[k] for run in runs[mode]) for k in _stages(runs[mode][0][2])}
        wall = statistics.median(walls)
        result[mode] = {
            "wall_s": wall,
            "walls": walls,
            "peak_rss_mb": max(r[1] for r in runs[mode]),
            "cpu_s": statistics.median(r[3] for r in runs[mode]),
            "ratio": statistics.median(ratios),
            "ratios": ratios,
            "gb_per_s": nbytes / 1e9 / wall,
            "stages": stages,
        }
    shutil.rmtree(model)
    return result


def _stages(stdout: str) -> dict[str, float]:
    """Stage seconds from quantize's `time: read 0.3 s, amax 0.1 s, ...` line."""
    line = next(ln for ln in stdout.splitlines() if ln.startswith("time: "))
    parts = line.removeprefix("time: ").split(" (total")[0].split(", ")
    return {p.split()[0]: float(p.split()[1]) for p in parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[0.5, 2.0])
    parser.add_argument("--repeat", type=int, default=7, help="interleaved rounds of copy + both modes")
    parser.add_argument("--tmp", type=Path, default=None)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-quantize-", dir=args.tmp))
    try:
        for size in args.sizes_gb:
            r = bench(size, tmp, args.repeat)
            budget = 3 * r["largest_tensor_mb"] + 300
            print(
                f"checkpoint {r['size_gb']:.2f} GB (largest tensor {r['largest_tensor_mb']:.0f} MB, load "
                f"{r['load']:.1f} on {os.cpu_count()} cores): cp -r + sync median {r['copy_s']:.2f} s "
                f"(runs {' '.join(f'{c:.2f}' for c in r['copies'])}), CPU {r['copy_cpu_s']:.2f} s"
            )
            for mode in MODES:
                m = r[mode]
                stages = ", ".join(f"{k} {v:.2f}" for k, v in m["stages"].items())
                spread = (max(m["ratios"]) - min(m["ratios"])) / m["ratio"]
                print(
                    f"  {mode:12s} {m['wall_s']:6.2f} s  {m['ratio']:.2f}x copy (rounds {min(m['ratios']):.2f}.."
                    f"{max(m['ratios']):.2f}, spread {spread:.1%}; target <= 2x)  {m['gb_per_s']:.2f} GB/s  "
                    f"CPU {m['cpu_s']:.2f} s  "
                    f"peak RSS {m['peak_rss_mb']:.0f} MB  [main thread: {stages}]  "
                    f"runs {' '.join(f'{w:.2f}' for w in m['walls'])}"
                )
            print(
                f"  low-cpu-mem RSS target <= 3 x largest + 300 MB = {budget:.0f} MB: "
                f"{'met' if r['low_cpu_mem']['peak_rss_mb'] <= budget else 'MISSED'}; "
                f"ratio target <= 2.0x: {'met' if r['low_cpu_mem']['ratio'] <= 2.0 else 'MISSED'}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
