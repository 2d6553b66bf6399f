"""Memory of vLLM CPU processes without weights or KV cache, at several TPs: the figures behind the memory pre-check.

    python benchmarks/bench_worker_memory.py [--tp 1 2 4 8] [--kv-mib 16]

For each TP a fresh driver starts vLLM (mp executor, one process per rank, the measurement profile) on
a tiny Llama with 16 heads (~10 MB of weights) with a KV cache of `--kv-mib` per rank, runs one short generation,
then reads every process of its tree from /proc: RSS (what `ps` shows; shared library pages are
counted in every process), PSS (shared pages split between the processes that map them: these add
up to the real total) and USS (private pages only), plus the peak RSS (VmHWM). Prints one row per
process kind and the per-node model `ray_calib/engine/memory.py` uses:
    node total = fixed (driver + engine core) + TP x per worker (PSS).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _child import children_by_parent  # benchmarks/ is on sys.path when run as a script

from ray_calib.engine.launch import EngineConfig, build_llm
from ray_calib.testing.tiny import model as tiny

MiB = 1 << 20


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (from /proc/*/stat parent pids)."""
    children = children_by_parent()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def memory_of(pid: int) -> dict[str, float] | None:
    """RSS, PSS, USS and peak RSS (MiB) of one process; None when it is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
        name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup.splitlines()[1:] if line.split()[-1] == "kB"}
    peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return {
        "name": name,
        "rss": fields["Rss"] / 1024,
        "pss": fields["Pss"] / 1024,
        "uss": (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024,
        "peak_rss": peak / 1024,
    }


def kind(name: str, pid: int, driver: int) -> str:
    if pid == driver:
        return "driver"
    if "EngineCore" in name:
        return "engine core"
    if "Worker" in name or "worker" in name:
        return "worker"
    return "other"


def child(model: str, tp: int, kv_mib: int) -> None:
    os.environ["RAY_CALIB_DEVICE"] = "cpu"

    llm = build_llm(
        EngineConfig(model=model, tp_size=tp, max_model_len=256, max_num_seqs=4, kv_cache_gib=kv_mib / 1024)
    )
    from vllm import SamplingParams

    llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    rows = []
    for pid in process_tree(os.getpid()):
        mem = memory_of(pid)
        if mem:
            rows.append({**mem, "kind": kind(mem["name"], pid, os.getpid())})
    print("ROWS " + json.dumps(rows))


def measure(model: Path, tp: int, kv_mib: int) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(model), str(tp), str(kv_mib)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS ")), None)
    if proc.returncode or line is None:
        sys.exit(f"TP {tp} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line.removeprefix("ROWS "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--kv-mib", type=int, default=16)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return

    # The tiny Llama with 16 heads (instead of 4), so that every TP up to 16 divides them.
    tiny.CONFIGS["llama"] = {**tiny.CONFIGS["llama"], "num_attention_heads": 16, "num_key_value_heads": 16}
    with tempfile.TemporaryDirectory(prefix="bench-worker-memory-") as tmp:
        model = tiny.make_tiny_model("llama", Path(tmp) / "llama").path
        weights = sum(p.stat().st_size for p in model.glob("*.safetensors")) / MiB
        print(
            f"vLLM CPU processes, tiny Llama ({weights:.0f} MiB of weights), KV cache {args.kv_mib} MiB per rank, "
            f"mp executor, {os.cpu_count()} cores; MiB"
        )
        print(f"{'TP':>3} {'kind':<12} {'n':>2} {'RSS':>7} {'PSS':>7} {'USS':>7} {'peak RSS':>9}")
        totals = {}
        for tp in args.tp:
            rows = measure(model, tp, args.kv_mib)
            for name in ("driver", "engine core", "worker", "other"):
                group = [r for r in rows if r["kind"] == name]
                if not group:
                    continue
                mean = {key: statistics.mean(r[key] for r in group) for key in ("rss", "pss", "uss", "peak_rss")}
                print(
                    f"{tp:>3} {name:<12} {len(group):>2} {mean['rss']:>7.0f} {mean['pss']:>7.0f} {mean['uss']:>7.0f} "
                    f"{mean['peak_rss']:>9.0f}"
                )
            totals[tp] = {
                "pss": sum(r["pss"] for r in rows),
                "rss": sum(r["rss"] for r in rows),
                "worker_pss": statistics.mean(r["pss"] for r in rows if r["kind"] == "worker") if tp > 1 else None,
            }
            print(f"{tp:>3} {'all':<12} {len(rows):>2} {totals[tp]['rss']:>7.0f} {totals[tp]['pss']:>7.0f}")
    print(json.dumps(totals))


if __name__ == "__main__":
    main()
