"""Observer overhead: `measure`'s generate loop against plain vLLM generate, same engine, same TP, interleaved.

    python benchmarks/bench_measure.py [--arch llama deepseek_v3] [--tp 1] [--rounds 10] [--prompts 128]
                                       [--new-tokens 64] [--batch 16] [--fp8-kv] [--profile PATH]

One fresh process per model starts one vLLM engine (the measure engine profile, observer extension
loaded) and runs the same prompts in rounds. Each round times both variants back to back, in
alternating order (ABBA), after one untimed warm-up of each:

    plain      llm.generate over the prompts, batch by batch: plain vLLM (no hooks are installed)
    observed   install the observers, then what `measure` does per chunk of prompts: generate batch
               by batch, gather every rank's stats (collective_rpc) and build its rank files; then
               remove the observers. Writing the chunk checkpoint (file I/O, fsync) is not observer
               work: it is timed apart and printed per chunk.

The observers' `remove()` restores the engine, so the two variants share weights, KV cache, threads and
memory state; the box is shared, so each round's ratio pairs two runs seconds apart and the figure is
the median ratio over rounds, printed with its spread (min-max and interquartile range). Target:
observed/plain <= 1.10. Run twice: the medians should agree within a few per cent.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _child import load_average  # noqa: E402

from ray_calib.data import load_prompts
from ray_calib.engine.launch import EngineConfig, build_llm
from ray_calib.measure.chunks import ChunkStore
from ray_calib.measure.extension import EXTENSION_CLS
from ray_calib.measure.preflight import blocklist
from ray_calib.measure.run import MeasureConfig, ObserverBackend, _run_chunk
from ray_calib.testing.tiny.calibset import make_calib_set
from ray_calib.testing.tiny.model import make_tiny_model
from ray_calib.ui import Bar

PROMPT_TOKENS = 64


def child(model: str, dataset: str, args: argparse.Namespace) -> dict:
    from vllm import SamplingParams

    token_ids = load_prompts(dataset, model, num_samples=args.prompts, least_tokens=PROMPT_TOKENS).token_ids
    llm = build_llm(
        EngineConfig(
            model=model,
            tp_size=args.tp,
            max_model_len=512,
            max_num_seqs=args.batch,
            worker_extension_cls=EXTENSION_CLS,
            observe_weights=True,
        )
    )
    names, types = blocklist(None, fp8_kv=args.fp8_kv, moe=True)
    backend = ObserverBackend(SimpleNamespace(fp8_kv=args.fp8_kv, block_names=names, block_types=types))
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0)  # as measure samples
    config = MeasureConfig(
        model=model,
        dataset=Path(dataset),
        out=Path(),
        tp_size=args.tp,
        batch_size=args.batch,
        max_new_tokens=args.new_tokens,
    )
    out = Path(tempfile.mkdtemp(prefix="bench-measure-chunks-"))

    def plain() -> int:
        generated = 0
        for start in range(0, len(token_ids), args.batch):
            batch = [{"prompt_token_ids": ids} for ids in token_ids[start : start + args.batch]]
            generated += sum(len(o.outputs[0].token_ids) for o in llm.generate(batch, params, use_tqdm=False))
        return generated

    writes: list[float] = []

    def observed() -> int:
        backend.install(llm)  # as `measure` installs them
        results = [
            _run_chunk(llm, index, token_ids[start : start + args.chunk], config, Bar("measure", len(token_ids)))
            for index, start in enumerate(range(0, len(token_ids), args.chunk))
        ]
        llm.collective_rpc("ray_calib_remove")
        return sum(r.generated_tokens for r in results), results

    def checkpoint(results) -> None:
        store = ChunkStore(out, {"bench": time.time()})
        store.clear()
        store.prepare(resume=False)
        for result in results:
            start = time.perf_counter()
            store.write(result)
            writes.append(time.perf_counter() - start)

    variants = {"plain": plain, "observed": observed}
    for run in variants.values():  # warm-up: first-call allocations, oneDNN primitive caches
        run()
    rounds = []
    for index in range(args.rounds):
        order = ("plain", "observed") if index % 4 in (0, 3) else ("observed", "plain")
        times, generated = {}, {}
        for name in order:
            start = time.perf_counter()
            generated[name] = variants[name]()
            times[name] = time.perf_counter() - start
            if name == "observed":
                generated[name], results = generated[name]
                checkpoint(results)
        assert generated["plain"] == generated["observed"], generated  # observers never change the tokens
        rounds.append({"plain": times["plain"], "observed": times["observed"], "generated": generated["plain"]})
    if args.profile:
        profile_round(variants, Path(args.profile))
    return {
        "rounds": rounds,
        "prompts": len(token_ids),
        "prompt_tokens": sum(map(len, token_ids)),
        "checkpoint_write_s": statistics.median(writes),
    }


def profile_round(variants: dict, out: Path) -> None:
    """One more round of each variant under cProfile: where the observed round's extra time goes."""
    for name, run in variants.items():
        profiler = cProfile.Profile()
        profiler.runcall(run)
        with open(out.with_suffix(f".{name}.txt"), "w") as stream:
            stats = pstats.Stats(profiler, stream=stream).sort_stats("tottime")
            stats.print_stats(40)


def run_model(arch: str, model: Path, dataset: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "RAY_CALIB_DEVICE": "cpu"}
    cmd = [sys.executable, __file__, "--child", str(model), str(dataset), *sys.argv[1:]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{arch} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(arch: str, result: dict, args: argparse.Namespace) -> None:
    rounds = result["rounds"]
    in_order = [r["observed"] / r["plain"] for r in rounds]
    ratios = sorted(in_order)
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    median = statistics.median(ratios)
    plain = statistics.median(r["plain"] for r in rounds)
    tokens = result["prompt_tokens"] + rounds[0]["generated"]
    print(
        f"{arch:<12} TP {args.tp}  {result['prompts']} prompts x {args.new_tokens} new tokens, "
        f"{len(rounds)} rounds; plain {plain:.2f} s/round ({tokens / plain:.0f} tokens/s)"
    )
    print(f"{'':<12} observed/plain per round, in order: {' '.join(f'{r:.3f}' for r in in_order)}")
    fastest = min(r["observed"] for r in rounds) / min(r["plain"] for r in rounds)
    print(f"{'':<12} fastest observed round / fastest plain round: {fastest:.3f} (interference only adds time)")
    verdict = "meets" if median <= 1.10 else "MISSES"
    print(
        f"{'':<12} chunk checkpoint write (not counted): {result['checkpoint_write_s'] * 1000:.0f} ms median per "
        f"{args.chunk} prompts"
    )
    print(
        f"{'':<12} overhead {median - 1:+.1%} median (IQR {quartiles[0] - 1:+.1%} .. {quartiles[2] - 1:+.1%}, "
        f"range {ratios[0] - 1:+.1%} .. {ratios[-1] - 1:+.1%}); {verdict} the target <= +10%"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["llama", "deepseek_v3"])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="prompts per generate call (measure's --batch-size)")
    parser.add_argument(
        "--chunk", type=int, default=64, help="prompts per gather + checkpoint (measure's --chunk-size)"
    )
    parser.add_argument("--fp8-kv", action="store_true", help="also observe K/V (measure --fp8-kv)")
    parser.add_argument("--profile", help="after the rounds, profile one round of each variant to PATH.<variant>.txt")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-measure-") as tmp:
        dataset = make_calib_set("pile", Path(tmp) / "pile.jsonl", num_samples=4 * args.prompts)
        print(f"load average at start {load_average():.2f} (the box is shared)")
        for arch in args.arch:
            model = make_tiny_model(arch, Path(tmp) / arch).path
            report(arch, run_model(arch, model, dataset, args), args)
        print(f"load average at end {load_average():.2f}")


if __name__ == "__main__":
    main()
