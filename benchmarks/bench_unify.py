"""Wall time and peak RSS of `ray-calib unify --to-tp 8` on the DeepSeek-R1 TP16 fixture, as a whole process.

Target: <= 0.45 s wall and < 150 MB peak RSS on the 2-core CI box; the hand-run Gaudi flow's unify script
(vllm-hpu-extension step-5) takes ~1.8 s there. For a like-for-like baseline on the same box this script
also times a straightforward re-implementation of the reference approach (json.load every rank, Python max,
json.dump + np.savez).

    python benchmarks/bench_unify.py [--runs 5] [--fixture DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from _child import run_child  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "inc-ds-r1-0528-g2-tp16"
REFERENCE_SECONDS = 1.8  # the upstream unify script on the 2-core CI box
TARGET_SECONDS, TARGET_RSS_MB = 0.45, 150

NAIVE = r"""
import glob, json, re, sys
import numpy as np
src, out, m = sys.argv[1], sys.argv[2], int(sys.argv[3])
files = sorted(glob.glob(f"{src}/*_hooks_maxabs_*_16.json"), key=lambda p: int(p.rsplit("_", 2)[1]))
data = [json.load(open(p)) for p in files]
n = len(data); g = n // m
pat = re.compile(r"^(.+)\.(w13_list|w2_list)\.(\d+)$")
E = len({int(pat.match(k)[3]) for k in data[0]["Nodes"] if pat.match(k) and "w13" in k and ".layers.3." in k})
def mx(vals):
    return [mx([v[i] for v in vals]) for i in range(len(vals[0]))] if isinstance(vals[0], list) else max(vals)
def arrays(node):
    return {
        f: {k: np.array(v, np.float32) for k, v in x.items()}
        if f == "params"
        else [np.array(v, np.float32) for v in x]
        for f, x in node.items()
    }
for i in range(m):
    grp = data[i * g:(i + 1) * g]; nodes = {}
    for name, node in grp[0]["Nodes"].items():
        hit = pat.match(name)
        if hit:
            for j, member in enumerate(grp):
                nodes[f"{hit[1]}.{hit[2]}.{int(hit[3]) + E * j}"] = member["Nodes"][name]
        elif name.endswith("moe_op"):
            outs = [r["Nodes"][name]["outputs"] for r in grp]
            nodes[name] = {
                "inputs": mx([r["Nodes"][name]["inputs"] for r in grp]),
                "outputs": [mx([o[0] for o in outs])] + [x for o in outs for x in o[1:]],
            }
        else:
            members = [r["Nodes"][name] for r in grp]
            nodes[name] = {
                f: ({k: mx([m[f][k] for m in members]) for k in v} if f == "params" else mx([m[f] for m in members]))
                for f, v in node.items()
            }
    stats = {"GlobalRank": None, "LocalRank": i, "Mode": "DynamicRange", "Nodes": nodes}
    json.dump(stats, open(f"{out}/x_hooks_maxabs_{i}_{m}.json", "w"), indent=4)
    holder = np.empty((), dtype=object); holder[()] = {**stats, "Nodes": {k: arrays(v) for k, v in nodes.items()}}
    np.savez(f"{out}/x_hooks_maxabs_{i}_{m}.npz", holder)
"""


def run_once(command: list[str], out: Path, *, create_out: bool = False) -> tuple[float, float]:
    """(wall seconds, peak RSS MB over the process and its children) of one command."""
    shutil.rmtree(out, ignore_errors=True)
    if create_out:
        out.mkdir(parents=True)
    return run_child(command)[:2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fixture", type=Path, default=FIXTURE)
    args = parser.parse_args()
    if not args.fixture.is_dir():
        sys.exit(f"fixture not found: {args.fixture} (the real INC files beside the checkout, docs/design.md §10)")
    ray_calib = [str(Path(sys.executable).with_name("ray-calib"))]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        ours = [
            run_once(ray_calib + ["unify", "--to-tp", "8", "--in", str(args.fixture), "--out", str(out)], out)
            for _ in range(args.runs)
        ]
        naive = [
            run_once([sys.executable, "-c", NAIVE, str(args.fixture), str(out), "8"], out, create_out=True)
            for _ in range(max(2, args.runs // 2))
        ]
    wall = statistics.median(w for w, _ in ours)
    rss = max(r for _, r in ours)
    naive_wall = statistics.median(w for w, _ in naive)
    print(f"ray-calib unify --to-tp 8 (DeepSeek-R1 TP16 fixture, {os.cpu_count()} cores, {args.runs} runs)")
    print(f"  wall median {wall:.3f} s (min {min(w for w, _ in ours):.3f} s), peak RSS {rss:.0f} MB")
    print(
        f"  target: <= {TARGET_SECONDS} s, < {TARGET_RSS_MB} MB -> "
        f"{'MET' if wall <= TARGET_SECONDS and rss < TARGET_RSS_MB else 'MISSED'}"
    )
    print(f"  vs the upstream unify script ({REFERENCE_SECONDS} s): {REFERENCE_SECONDS / wall:.1f}x faster")
    print(
        f"  vs naive json+numpy re-implementation measured here ({naive_wall:.3f} s, "
        f"peak {max(r for _, r in naive):.0f} MB): {naive_wall / wall:.1f}x faster"
    )


if __name__ == "__main__":
    main()
