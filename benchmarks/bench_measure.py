"""Observer overhead: the same prompts through plain vLLM generate and through `measure`, same TP.

    python benchmarks/bench_measure.py [--arch llama deepseek_v3] [--tp 1] [--prompts 32] [--new-tokens 32]

Each mode runs in its own fresh process (vLLM started the same way by `ray_calib.engine`); the timed
part is only the generation loop (plus, for measure, installing the observers, gathering every
rank's stats after each chunk and writing the checkpoint), after one warm-up batch. Prints prompts/s,
tokens/s and peak RSS per mode and the overhead ratio (target: <= 10%).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 8
CHUNK = 64  # measure's default --chunk-size


def child(mode: str, model: str, dataset: str, tp: int, prompts: int, new_tokens: int, out: str) -> dict:
    from ray_calib.data import load_prompts
    from ray_calib.engine.launch import EngineConfig, build_llm
    from ray_calib.measure.chunks import ChunkStore
    from ray_calib.measure.extension import EXTENSION_CLS
    from ray_calib.measure.preflight import blocklist
    from ray_calib.measure.run import MeasureConfig, _run_chunk
    from ray_calib.ui import Bar

    token_ids = load_prompts(dataset, model, num_samples=prompts + BATCH, least_tokens=64).token_ids
    warmup, token_ids = token_ids[:BATCH], token_ids[BATCH:]
    measure = mode == "measure"
    llm = build_llm(EngineConfig(model=model, tp_size=tp, max_model_len=512, max_num_seqs=BATCH,
                                 worker_extension_cls=EXTENSION_CLS if measure else None, observe_weights=measure))
    config = MeasureConfig(model=model, dataset=Path(dataset), out=Path(out), tp_size=tp, batch_size=BATCH,
                           max_new_tokens=new_tokens, chunk_size=CHUNK)
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    llm.generate([{"prompt_token_ids": ids} for ids in warmup], params, use_tqdm=False)
    start = time.perf_counter()
    generated = 0
    if measure:
        llm.collective_rpc("ray_calib_install", args=(False, blocklist(None, fp8_kv=False, moe=True)[0], []))
        store = ChunkStore(Path(out), {})
        store.prepare(resume=False)
        for index in range(0, len(token_ids), CHUNK):
            result = _run_chunk(llm, index // CHUNK, token_ids[index:index + CHUNK], config, Bar("measure", len(token_ids)))
            store.write(result)
            generated += result.generated_tokens
    else:
        for index in range(0, len(token_ids), BATCH):
            batch = token_ids[index:index + BATCH]
            outputs = llm.generate([{"prompt_token_ids": ids} for ids in batch], params, use_tqdm=False)
            generated += sum(len(o.outputs[0].token_ids) for o in outputs)
    seconds = time.perf_counter() - start
    tokens = sum(map(len, token_ids)) + generated
    return {"mode": mode, "seconds": seconds, "prompts_per_s": len(token_ids) / seconds, "tokens_per_s": tokens / seconds,
            "generated": generated, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_mode(mode: str, model: Path, dataset: Path, args) -> dict:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "RAY_CALIB_DEVICE": "cpu"}
    with tempfile.TemporaryDirectory(prefix="bench-measure-") as out:
        cmd = [sys.executable, __file__, "--child", mode, str(model), str(dataset), str(args.tp), str(args.prompts),
               str(args.new_tokens), out]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["llama", "deepseek_v3"])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, model, dataset, tp, prompts, new_tokens, out = args.child
        print(json.dumps(child(mode, model, dataset, int(tp), int(prompts), int(new_tokens), out)))
        return
    from ray_calib.testing.tiny.calibset import make_calib_set
    from ray_calib.testing.tiny.model import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-measure-") as tmp:
        dataset = make_calib_set("pile", Path(tmp) / "pile.jsonl", num_samples=4 * (args.prompts + BATCH))
        print(f"{'model':<12} {'TP':>2} {'mode':<8} {'prompts/s':>10} {'tokens/s':>9} {'seconds':>8} {'peak RSS MB':>12}")
        for arch in args.arch:
            model = make_tiny_model(arch, Path(tmp) / arch).path
            rows = {mode: run_mode(mode, model, dataset, args) for mode in ("generate", "measure")}
            for mode, row in rows.items():
                print(f"{arch:<12} {args.tp:>2} {mode:<8} {row['prompts_per_s']:>10.2f} {row['tokens_per_s']:>9.0f} "
                      f"{row['seconds']:>8.2f} {row['peak_rss_mb']:>12.0f}")
            overhead = rows["generate"]["prompts_per_s"] / rows["measure"]["prompts_per_s"] - 1
            print(f"{arch:<12} {args.tp:>2} overhead {overhead:+.1%} (measure vs plain generate; target <= +10%)")


if __name__ == "__main__":
    main()
