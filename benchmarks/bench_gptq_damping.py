"""GPTQ's damping, chosen on the validation split of `bench_quality.py` (never on held-out text).

    python benchmarks/bench_gptq_damping.py [--damping 0.01 0.03 0.1 0.3]

Run `bench_quality.py` first: this reuses its measurement of SmolLM2 (measure/ with the hessians) and draws
the same validation split (the pydoc calibration-half passages after the calibrated ones). ray-calib's
default checkpoint (full-range scales, GPTQ rounding, BF16 KV) is written once per damping (the share of the
mean H diagonal added before the inverse, `convert/gptq.py` DAMP), and BF16 and each checkpoint are scored
by vLLM on the validation passages. Prints perplexity, mean KL and top-1 against BF16 per damping, and the
damping the split picks (lowest mean KL) next to the default.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's ray_calib
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_quality's split
import bench_quality  # noqa: E402

from ray_calib.convert import gptq  # noqa: E402
from ray_calib.convert.plan import load_measurement  # noqa: E402
from ray_calib.convert.quantize import QuantizeJob, quantize_checkpoint  # noqa: E402
from ray_calib.convert.scale_choice import DEFAULT  # noqa: E402
from ray_calib.data import texts  # noqa: E402
from ray_calib.inc.devices import get_device  # noqa: E402
from ray_calib.infer import fidelity  # noqa: E402
from ray_calib.measurements.hessians import load_model_hessians  # noqa: E402
from ray_calib.realmodel import smollm2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--damping", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--calib-samples", type=int, default=64, help="As bench_quality was run.")
    parser.add_argument("--calib-tokens", type=int, default=256, help="As bench_quality was run.")
    parser.add_argument("--validation", type=int, default=12, help="As bench_quality was run.")
    args = parser.parse_args()

    work = smollm2.cache_root() / "bench" / "quality"
    measure = work / "ray-calib" / "measure"
    hessians = load_model_hessians(measure) if measure.is_dir() else None
    if hessians is None:
        sys.exit(f"no measurement with hessians in {measure}: run benchmarks/bench_quality.py first")
    model, _ = smollm2.model_dir()
    passages = texts.sample("pydoc", "calibration", 2 * args.calib_samples + args.validation)
    _, validation = bench_quality._long_enough(model, passages, args.calib_tokens, args.calib_samples)
    windows, _ = fidelity.token_windows(fidelity.tokenize(model, validation[: args.validation]), 1024)

    measurement, _ = load_measurement(measure)
    checkpoints = {}
    default = gptq.DAMP
    try:
        for damping in args.damping:
            gptq.DAMP = damping  # what GPTQ adds to H's diagonal, for this checkpoint only
            out = work / "damping" / f"gptq-damp-{damping:g}"
            job = QuantizeJob(
                model=model,
                measurement=measurement,
                out=out,
                method=DEFAULT.method,
                device=get_device("cpu"),
                fp8_kv=False,
                kv_rule=DEFAULT.kv_rule(),
                hessians=hessians,
                force=True,
            )
            quantize_checkpoint(job)
            checkpoints[damping] = out
    finally:
        gptq.DAMP = default

    tokens = sum(len(w) for w in windows)
    print(f"validation split: {len(validation[: args.validation])} passages, {len(windows)} windows, {tokens} tokens")
    reference = _score("BF16", model, windows)
    rows = []
    for damping, out in checkpoints.items():
        positions = _score(f"damping {damping:g}", out, windows)
        kl = fidelity.mean_kl(reference, positions)
        rows.append((damping, fidelity.perplexity(positions), kl, fidelity.top1_agreement(reference, positions)))
    print(f"BF16 perplexity {fidelity.perplexity(reference):.3f}")
    print("  damping  perplexity  mean KL  top-1")
    for damping, ppl, kl, top1 in rows:
        mark = "  (default)" if damping == default else ""
        print(f"  {damping:<7g}  {ppl:10.3f}  {kl:7.4f}  {top1:5.3f}{mark}")
    best = min(rows, key=lambda row: row[2])[0]
    print(f"picked on the validation split (lowest mean KL): {best:g}; default {default:g}")


def _score(name: str, model: Path, windows: list[list[int]]) -> list:
    started = time.perf_counter()
    variant = fidelity.Variant(name, model)
    scored = fidelity.score(variant, windows, tp_size=1, device="cpu", engine_options={"max_model_len": 1024})
    print(f"    scored {name} in {time.perf_counter() - started:.0f} s", flush=True)
    return scored["positions"]


if __name__ == "__main__":
    main()
