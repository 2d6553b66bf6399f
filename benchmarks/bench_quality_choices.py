"""ray-calib's own choices for the CPU/CUDA checkpoint, made on the validation split of `bench_quality.py`
(never on held-out text): GPTQ's damping, the weight/activation scale rule, the k/v scale rule.

    python benchmarks/bench_quality_choices.py [--damping 0.01 0.03 0.1 0.3]

Run `bench_quality.py` first: this reuses its measurement of SmolLM2 (measure/ with the hessians) and draws
the same validation split (the pydoc calibration-half passages after the calibrated ones). Three grids, each
building on the pick of the one before, every checkpoint GPTQ-rounded (ray-calib's default rounding):

    1 damping  the default scales at each damping (the share of the mean H diagonal added before the
               inverse, `convert/gptq.py` DAMP), BF16 KV
    2 scales   each weight/activation rule of `convert/scale_choice.py` CANDIDATES at the picked damping, BF16 KV
    3 k/v      the picked weights on an FP8 cache with each k/v backoff of the candidates, and with vLLM's
               scale 1.0 (the checkpoint without k/v scales, what `quantize --fp8-kv` weighs them against)

BF16 and each checkpoint are scored by vLLM on the validation passages (scores cached under the work dir);
each grid prints perplexity, mean KL and top-1 against BF16 (BF16 cache), each candidate's KL ratio to the
default with its paired-bootstrap 95 % interval over the validation windows, and its pick: the candidate with
the lowest mean KL among those whose whole interval lies below 1, else the default. A default changes on
evidence beyond the noise of the split, not on a 1 % wobble (the peer's recipes in bench_quality are picked
by lowest mean KL alone, which can only favour the peer).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's ray_calib
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_quality's split
import bench_quality  # noqa: E402

from ray_calib.convert import gptq  # noqa: E402
from ray_calib.convert.plan import load_measurement  # noqa: E402
from ray_calib.convert.quantize import QuantizeJob, quantize_checkpoint  # noqa: E402
from ray_calib.convert.scale_choice import CANDIDATES, DEFAULT, ScaleChoice  # noqa: E402
from ray_calib.data import texts  # noqa: E402
from ray_calib.inc.devices import get_device  # noqa: E402
from ray_calib.inc.methods import TensorRule  # noqa: E402
from ray_calib.infer import fidelity  # noqa: E402
from ray_calib.infer.unit_kv import without_kv_scales  # noqa: E402
from ray_calib.measurements.hessians import load_model_hessians  # noqa: E402
from ray_calib.realmodel import smollm2  # noqa: E402

UNIT = "scale 1.0"
VALIDATION = bench_quality.VALIDATION


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
    print(f"validation split: {args.validation} passages, {len(windows)} windows, {sum(map(len, windows))} tokens")
    grid = Grid(model, work / "choices", load_measurement(measure)[0], hessians, windows)

    damping = grid.pick(
        "1 GPTQ damping (default scales, BF16 KV)",
        {f"{d:g}": grid.checkpoint(DEFAULT, damping=d) for d in args.damping},
        default=f"{gptq.DAMP:g}",
    )
    rules: dict = {}  # candidates differing only in k/v share their weights: the first of each stands for them
    for candidate in CANDIDATES.values():
        rules.setdefault(_rule_key(candidate), candidate)
    rule = grid.pick(
        f"2 weight/activation scales (GPTQ damping {damping}, BF16 KV)",
        {c.name: grid.checkpoint(c, damping=float(damping)) for c in rules.values()},
        default=rules[_rule_key(DEFAULT)].name,
    )
    weights = CANDIDATES[rule]
    backoffs = sorted({c.kv_backoff for c in CANDIDATES.values()})
    kv_rows = {
        f"k/v backoff {b:g}": grid.checkpoint(
            ScaleChoice(f"{weights.name}-kv{b:g}", weights.method, b), damping=float(damping), fp8_kv=True
        )
        for b in backoffs
    }
    kv_rows[UNIT] = grid.unit_kv(kv_rows[f"k/v backoff {backoffs[-1]:g}"])
    grid.pick(f"3 k/v scales ({rule}, FP8 KV)", kv_rows, default=f"k/v backoff {DEFAULT.kv_backoff:g}", fp8_kv=True)


def _rule_key(choice: ScaleChoice) -> tuple[TensorRule, TensorRule]:
    return choice.method.weight, choice.method.activation


class Grid:
    """Checkpoints of one measurement written into `work`, scored on the validation windows against BF16."""

    def __init__(self, model: Path, work: Path, measurement, hessians, windows: list[list[int]]) -> None:
        self.model, self.work, self.measurement, self.hessians, self.windows = (
            model,
            work,
            measurement,
            hessians,
            windows,
        )
        self.reference = self._score("BF16", model, fp8_kv=False)

    def checkpoint(self, choice: ScaleChoice, *, damping: float, fp8_kv: bool = False) -> Path:
        out = self.work / f"{choice.name}-damp{damping:g}{'-kv' if fp8_kv else ''}"
        default, gptq.DAMP = gptq.DAMP, damping  # what GPTQ adds to H's diagonal, for this checkpoint only
        try:
            quantize_checkpoint(
                QuantizeJob(
                    model=self.model,
                    measurement=self.measurement,
                    out=out,
                    method=choice.method,
                    device=get_device("cpu"),
                    fp8_kv=fp8_kv,
                    kv_rule=choice.kv_rule(),
                    hessians=self.hessians,
                    force=True,
                )
            )
        finally:
            gptq.DAMP = default
        return out

    def unit_kv(self, checkpoint: Path) -> Path:
        dest = checkpoint.with_name(checkpoint.name + "-unit")
        shutil.rmtree(dest, ignore_errors=True)
        if without_kv_scales(checkpoint, dest) is None:
            sys.exit(f"{checkpoint}: an FP8-KV checkpoint without k/v scales")
        return dest

    def pick(self, title: str, rows: dict[str, Path], *, default: str, fp8_kv: bool = False) -> str:
        """Score every row, print the grid, return the pick (see the module docstring)."""
        scored = {name: self._score(name, path, fp8_kv=fp8_kv) for name, path in rows.items()}
        windows = {
            name: [bench_quality._window_sums(r, p) for r, p in zip(self.reference, positions)]
            for name, positions in scored.items()
        }
        rng = bench_quality._rng()
        ratios = {name: _kl_ratio(windows[name], windows[default], rng) for name in rows}
        better = [name for name in rows if ratios[name][2] < 1.0]
        best = min(better, key=lambda name: ratios[name][0], default=default)
        print(f"\n{title}; BF16 perplexity {fidelity.perplexity(self.reference):.3f}")
        print(f"  {'':<22} {'perplexity':>10} {'mean KL':>8} {'top-1':>6}  KL / default [95 %]")
        for name, positions in scored.items():
            ratio, low, high = ratios[name]
            marks = [m for m, on in (("picked", name == best), ("default", name == default)) if on]
            print(
                f"  {name:<22} {fidelity.perplexity(positions):10.3f} "
                f"{fidelity.mean_kl(self.reference, positions):8.4f} "
                f"{fidelity.top1_agreement(self.reference, positions):6.3f}  "
                f"{ratio:.3f} [{low:.3f}, {high:.3f}]  {' '.join(marks)}"
            )
        print(f"picked on the validation split: {best}; default {default}", flush=True)
        return best

    def _score(self, name: str, model: Path, *, fp8_kv: bool) -> list:
        """The positions of `model` on the validation windows, cached by checkpoint, cache and windows."""
        key = hashlib.sha256(json.dumps([str(model), fp8_kv, self.windows]).encode()).hexdigest()[:16]
        saved = self.work / "scores" / f"{model.name}-{'fp8' if fp8_kv else 'bf16'}-{key}.json"
        if saved.exists():
            return json.loads(saved.read_text())
        started = time.perf_counter()
        variant = fidelity.Variant(name, model, fp8_kv=fp8_kv)
        scored = fidelity.score(variant, self.windows, tp_size=1, device="cpu", engine_options={"max_model_len": 1024})
        print(f"    scored {name} in {time.perf_counter() - started:.0f} s", flush=True)
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(scored["positions"]))
        return scored["positions"]


def _kl_ratio(candidate: list, default: list, rng) -> tuple[float, float, float]:
    """(KL ratio, 2.5 %, 97.5 %) of `candidate` over `default`, windows resampled together (bench_quality's)."""
    results = {0: {VALIDATION: {"windows": candidate}}, 1: {VALIDATION: {"windows": default}}}
    return bench_quality._ratios(results, 0, 1, VALIDATION, rng)["kl"]


if __name__ == "__main__":
    main()
