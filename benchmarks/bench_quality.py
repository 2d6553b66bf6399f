"""FP8 quality on a real model, side by side: BF16 vs ray-calib FP8 vs llm-compressor FP8, each with and
without an FP8 KV cache, on held-out text of three kinds; and the calibration wall time of each.

    python benchmarks/bench_quality.py [--calib-samples 64] [--calib-tokens 256] [--heldout 24]
                                       [--lock /tmp/ray-calib-heavy.lock] [--work DIR]

    1 prepare    SmolLM2-135M-Instruct (imported once into the cache), calibration passages (pydoc,
                 calibration half) and a validation split of the same source (the next --validation
                 passages of that half, never calibrated on), held-out passages (pydoc held-out half,
                 licences, Debian docs), llm-compressor 0.14 in its own venv under the cache (torch pinned
                 to the CPU wheel)
    2 ray-calib  `ray-calib measure --fp8-kv` at TP1 on the calibration texts (recording hessians, the default
                 for a model this size), then `quantize`: the CPU/CUDA default (GPTQ rounding) and the same
                 scales rounded to nearest, each with and without k/v scales (the other candidates of
                 convert/scale_choice.py are weighed on the validation split by bench_quality_choices.py)
    3 peer       llm-compressor oneshot with each of its recipes (`RECIPES`: round to nearest, GPTQ, and
                 SmoothQuant 0.5 / 0.8 + GPTQ; scheme FP8, ignore lm_head, documented defaults), same texts
                 and count, truncated to the same length; each once more with its FP8 kv_cache_scheme
    4 score      every model through vLLM (prefill, top-20 logprobs) on the same token windows; the FP8-KV
                 rows run kv_cache_dtype "fp8" with the checkpoint's k/v scales and again with scale 1.0
                 (the checkpoint without them, `infer/unit_kv.py`), the others "bfloat16"
    5 report     one table per held-out source (perplexity, mean KL and top-1 agreement against BF16 with a
                 BF16 cache), each side's pick made on the validation split alone (the peer's best recipe
                 and KV scales; ours: calibrated k/v scales or 1.0), then the targets on every held-out
                 source (KL <= 0.9x the peer's best, top-1 >= its, perplexity <= its or a paired-bootstrap
                 ratio interval holding 1.0), results.json and quality.png in the work dir
Each heavy phase (vLLM, llm-compressor) takes --lock (a flock file) for itself only, so other users of the
box get turns.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's ray_calib, whichever the venv installed
from ray_calib.convert.plan import load_measurement
from ray_calib.convert.quantize import QuantizeJob, quantize_checkpoint
from ray_calib.convert.scale_choice import DEFAULT
from ray_calib.data import texts
from ray_calib.inc.devices import get_device
from ray_calib.infer import fidelity
from ray_calib.infer.unit_kv import without_kv_scales
from ray_calib.measurements.hessians import load_model_hessians
from ray_calib.realmodel import smollm2

REPO = Path(__file__).resolve().parents[1]
PEER_VERSION = "0.14.0.1"
SOURCES = ("pydoc", "licenses", "debian-docs")
VALIDATION = "validation"  # the calibration source's split the choices are made on
KL_RATIO = 0.9
BOOTSTRAP = 2000
RECIPES = ("rtn", "gptq", "sq0.5+gptq", "sq0.8+gptq")  # the peer's (benchmarks/_llmcompressor_peer.py)


@dataclass
class Model:
    kind: str  # "BF16", "ray-calib", "llm-compressor"
    path: Path
    fp8_kv: bool  # run on an FP8 cache
    calib_seconds: float | None = None
    choice: str | None = None  # ray-calib: the scale candidate (convert/scale_choice.py), "+gptq" if GPTQ-rounded;
    # llm-compressor: the recipe (RECIPES)
    kv_one: bool = False  # the FP8-KV checkpoint without its k/v scales: vLLM's scale 1.0

    @property
    def label(self) -> str:
        """ray-calib's default is plain "ray-calib", the peer's recipes "llm-compressor:<recipe>"; " kv=1.0"
        marks a scale-1.0 row."""
        suffix = " kv=1.0" if self.kv_one else ""
        if self.kind == "llm-compressor":
            return f"{self.kind}:{self.choice}{suffix}"
        if self.kind != "ray-calib" or self.default:
            return self.kind + suffix
        return f"ray-calib:{self.choice}{suffix}"

    @property
    def default(self) -> bool:
        return self.kind == "ray-calib" and self.choice == f"{DEFAULT.name}+gptq"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-tokens", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=24, help="Passages per held-out source.")
    parser.add_argument(
        "--validation", type=int, default=12, help="Passages of the calibration source the choices are made on."
    )
    parser.add_argument("--lock", type=Path, help="flock file taken around each heavy phase.")
    parser.add_argument("--work", type=Path, help="Work dir [default: <cache>/bench/quality].")
    parser.add_argument(
        "--reuse", action="store_true", help="Keep calibrations in --work made from the same calibration texts."
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="Print the table of the last run in --work again (e.g. after changing the default).",
    )
    args = parser.parse_args()

    work = args.work or smollm2.cache_root() / "bench" / "quality"
    work.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        saved = json.loads((work / "results.json").read_text())
        rows = [
            Model(r["kind"], Path(r["path"]), r["fp8_kv"], r["calib_seconds"], r["choice"], r.get("kv_one", False))
            for r in saved["rows"]
        ]
        vars(args).update({k: v for k, v in saved["args"].items() if k in ("heldout",)})
        if VALIDATION not in saved["results"]["0"]:
            sys.exit("results.json of a run without a validation split: nothing to choose on; run the benchmark again")
        _report({int(k): v for k, v in saved["results"].items()}, rows, work, args)
        return
    print("(1/5) prepare", flush=True)
    with _locked(args.lock if not smollm2.is_built(smollm2.default_dir(), smollm2.gguf_path()) else None):
        model, _ = smollm2.model_dir()
    passages = texts.sample("pydoc", "calibration", 2 * args.calib_samples + args.validation)
    calibration, validation = _long_enough(model, passages, args.calib_tokens, args.calib_samples)
    calib = texts.write_jsonl(calibration, work / "calibration.jsonl")
    heldout = {s: texts.sample(s, "heldout", args.heldout) for s in SOURCES}
    if len(validation) < args.validation:
        sys.exit(f"only {len(validation)} validation passages are left after the calibration ones; ask for fewer")
    heldout[VALIDATION] = validation[: args.validation]
    peer_python = _peer_venv(smollm2.cache_root() / "bench" / f"llmcompressor-{PEER_VERSION}")

    print("(2/5) ray-calib: measure + quantize", flush=True)
    ours = _ray_calib(model, calib, work, args)
    print("(3/5) llm-compressor oneshot", flush=True)
    peer = _peer(peer_python, model, calib, work, args)

    print("(4/5) score", flush=True)
    rows = [Model("BF16", model, False), Model("BF16", model, True), *ours, *peer]
    rows += _scale_one_rows(rows, work)
    results = _score_all(model, rows, heldout, work, args)
    print("(5/5) report", flush=True)
    _report(results, rows, work, args)


# ---- phases ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(lock: Path | None):
    if lock is None:
        yield
        return
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _long_enough(model: Path, passages: list[str], tokens: int, count: int) -> tuple[list[str], list[str]]:
    """(the first `count` passages of at least `tokens` tokens, the passages after them): both calibrations
    see the same `count` texts, each truncated to `tokens` (measure drops shorter ones, llm-compressor would
    not); the rest of the source, never calibrated on, is the validation split."""
    long = [i for i, ids in enumerate(fidelity.tokenize(model, passages)) if len(ids) >= tokens][:count]
    if len(long) < count:
        sys.exit(f"only {len(long)} calibration passages have {tokens} tokens; ask for fewer --calib-samples")
    return [passages[i] for i in long], passages[long[-1] + 1 :]


def _scale_one_rows(rows: list[Model], work: Path) -> list[Model]:
    """Each FP8-KV checkpoint of ours (the default) and the peer's once more without its k/v scales."""
    extra = []
    for row in rows:
        if row.fp8_kv and (row.default or row.kind == "llm-compressor"):
            dest = work / "kv-scale-1" / f"{row.kind}-{row.path.name}"
            shutil.rmtree(dest, ignore_errors=True)
            if without_kv_scales(row.path, dest) is None:
                sys.exit(f"{row.path}: an FP8-KV checkpoint without k/v scales")
            extra.append(Model(row.kind, dest, True, row.calib_seconds, row.choice, kv_one=True))
    return extra


def _peer_venv(venv: Path) -> Path:
    """llm-compressor in a venv of its own (it wants other transformers/compressed-tensors versions)."""
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if stamp.exists():
        return python
    uv = Path(sys.executable).parent / "uv"
    env = {**os.environ, "SSL_CERT_FILE": os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")}
    pins = [
        "-c",
        str(REPO / "constraints.txt"),
        "--excludes",
        str(REPO / "excludes.txt"),
        "--find-links",
        "/opt/wheels",
    ]
    print(f"    building llm-compressor {PEER_VERSION} venv at {venv}", flush=True)
    subprocess.run([str(uv), "venv", "-q", "--python", sys.executable, str(venv)], check=True, env=env)
    subprocess.run(
        [str(uv), "pip", "install", "-q", "--python", str(python), *pins, "torch==2.13.0"], check=True, env=env
    )
    subprocess.run(
        [str(uv), "pip", "install", "-q", "--python", str(python), *pins, f"llmcompressor=={PEER_VERSION}", "datasets"],
        check=True,
        env=env,
    )
    stamp.touch()
    return python


def _ray_calib(model: Path, calib: Path, work: Path, args) -> list[Model]:
    measure = work / "ray-calib" / "measure"
    seconds = _reused(work / "ray-calib" / "measure-seconds.json", calib, args)
    if seconds is None:
        command = [
            sys.executable,
            "-m",
            "ray_calib.cli",
            "measure",
            "--model",
            str(model),
            "--dataset",
            str(calib),
            "--tp",
            "1",
            "--fp8-kv",
            "--num-samples",
            str(args.calib_samples),
            "--least-tokens",
            str(args.calib_tokens),
            "--max-new-tokens",
            "1",
            "--out",
            str(measure),
            "--force",
        ]
        with _locked(args.lock):
            started = time.perf_counter()
            subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
            seconds = time.perf_counter() - started
        _save_timing(work / "ray-calib" / "measure-seconds.json", calib, seconds)
    measurement, _ = load_measurement(measure)
    hessians = load_model_hessians(measure)  # measure records them by default for a model this small
    if hessians is None:
        sys.exit(f"{measure} holds no hessians: ray-calib's default (GPTQ rounding) cannot be scored")
    runs = [(DEFAULT, True), (DEFAULT, False)]  # (scales, GPTQ); the other candidates: bench_quality_choices.py
    models = []
    with _locked(None):  # a 135M checkpoint quantizes in seconds: no need to queue for the heavy lock
        for choice, gptq in runs:
            for fp8_kv in (False, True):
                name = f"{choice.name}{'+gptq' if gptq else ''}"
                out = work / "ray-calib" / f"{name}{'-kv' if fp8_kv else ''}"
                started = time.perf_counter()
                job = QuantizeJob(
                    model=model,
                    measurement=measurement,
                    out=out,
                    method=choice.method,
                    device=get_device("cpu"),
                    fp8_kv=fp8_kv,
                    kv_rule=choice.kv_rule(),
                    hessians=hessians if gptq else None,
                    force=True,
                )
                quantize_checkpoint(job)
                models.append(Model("ray-calib", out, fp8_kv, seconds + time.perf_counter() - started, name))
    return models


def _peer(python: Path, model: Path, calib: Path, work: Path, args) -> list[Model]:
    models = []
    with _locked(args.lock):
        for recipe, fp8_kv in ((r, kv) for r in RECIPES for kv in (False, True)):
            out = work / "llm-compressor" / f"{recipe}-{'fp8-kv' if fp8_kv else 'fp8'}"
            timing = out.parent / f"{out.name}-seconds.json"
            wall = _reused(timing, calib, args)
            if wall is None:
                command = [
                    str(python),
                    str(REPO / "benchmarks" / "_llmcompressor_peer.py"),
                    str(model),
                    str(calib),
                    str(out),
                    "--num-samples",
                    str(args.calib_samples),
                    "--max-tokens",
                    str(args.calib_tokens),
                    "--recipe",
                    recipe,
                ]
                started = time.perf_counter()
                result = subprocess.run(command + (["--fp8-kv"] if fp8_kv else []), capture_output=True, text=True)
                wall = time.perf_counter() - started
                if result.returncode != 0:
                    sys.exit(f"llm-compressor failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
                _save_timing(timing, calib, wall)
            models.append(Model("llm-compressor", out, fp8_kv, wall, recipe))
    return models


def _reused(timing: Path, calib: Path, args) -> float | None:
    """The wall time of an earlier calibration on the same texts, when --reuse allows it."""
    if not (args.reuse and timing.exists()):
        return None
    saved = json.loads(timing.read_text())
    return saved["seconds"] if isinstance(saved, dict) and saved.get("texts") == _digest(calib) else None


def _save_timing(timing: Path, calib: Path, seconds: float) -> None:
    timing.parent.mkdir(parents=True, exist_ok=True)
    timing.write_text(json.dumps({"seconds": seconds, "texts": _digest(calib)}))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest_windows(windows: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(windows).encode()).hexdigest()


def _score_all(model: Path, rows: list[Model], heldout: dict[str, list[str]], work: Path, args) -> dict:
    """{row index: {source: {"ppl", "kl", "top1"}}}, against BF16 on a BF16 cache."""
    windows, spans = [], {}
    for source, passages in heldout.items():
        source_windows, _ = fidelity.token_windows(fidelity.tokenize(model, passages), 1024)
        spans[source] = (len(windows), len(windows) + len(source_windows))
        windows += source_windows
    scored = {}
    with _locked(args.lock):
        for index, row in enumerate(rows):
            variant = fidelity.Variant(row.label, row.path, fp8_kv=row.fp8_kv)
            started = time.perf_counter()
            kv = "kv1" if row.kv_one else ("fp8-kv" if row.fp8_kv else "bf16-kv")
            saved = work / "scores" / f"{row.path.name}-{row.kind}-{kv}.json"
            key = _digest_windows(windows)
            if args.reuse and saved.exists() and json.loads(saved.read_text()).get("windows") == key:
                scored[index] = json.loads(saved.read_text())
            else:
                scored[index] = fidelity.score(
                    variant, windows, tp_size=1, device="cpu", engine_options={"max_model_len": 1024}
                )
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps({**scored[index], "windows": key}))
            print(
                f"    scored {row.label:<32} KV {scored[index]['kv_cache_dtype']:<9} in "
                f"{time.perf_counter() - started:.0f} s",
                flush=True,
            )
    reference = scored[0]["positions"]
    results = {}
    for index in scored:
        results[index] = {"kv_cache_dtype": scored[index]["kv_cache_dtype"]}
        for source, (start, end) in spans.items():
            positions, ref = scored[index]["positions"][start:end], reference[start:end]
            results[index][source] = {
                "ppl": fidelity.perplexity(positions),
                "kl": fidelity.mean_kl(ref, positions),
                "top1": fidelity.top1_agreement(ref, positions),
                "positions": sum(len(p) for p in positions),
                "windows": [_window_sums(r, p) for r, p in zip(ref, positions)],
            }
    return results


def _window_sums(reference: list, positions: list) -> list[float]:
    """[negative log-likelihood, positions, KL, top-1 hits] of one window: what the noise estimate resamples."""
    return [
        -sum(p["actual"] for p in positions),
        len(positions),
        sum(fidelity.position_kl(r["top"], p["top"]) for r, p in zip(reference, positions)),
        sum(r["argmax"] == p["argmax"] for r, p in zip(reference, positions)),
    ]


# ---- report ---------------------------------------------------------------------------------------------


def _report(results: dict, rows: list[Model], work: Path, args) -> None:
    lines = []
    for source in (VALIDATION, *SOURCES):
        positions = results[0][source]["positions"]
        what = (
            "calibration source, not calibrated on: the choices are made here" if source == VALIDATION else "held out"
        )
        lines.append(f"\n{source} ({what}, {positions} scored tokens)")
        lines.append(f"  {'model':<40} {'KV cache':<9} {'perplexity':>10} {'mean KL':>8} {'top-1':>6} {'calib s':>8}")
        for index, row in enumerate(rows):
            figures = results[index][source]
            calib = f"{row.calib_seconds:.0f}" if row.calib_seconds is not None else "-"
            kv = "fp8 (1.0)" if row.kv_one else results[index]["kv_cache_dtype"]
            lines.append(
                f"  {row.label:<40} {kv:<9} {figures['ppl']:>10.3f} "
                f"{figures['kl']:>8.4f} {figures['top1']:>6.3f} {calib:>8}"
            )
    picks = _picks(results, rows)
    chosen = [
        f"  {'FP8 KV' if kv else 'BF16 KV':<8} ours {rows[a].label}, the peer's best {rows[b].label}"
        for kv, (a, b) in picks.items()
    ]
    text = "\n".join(
        lines
        + ["", "picked on the validation split (lowest mean KL):", *chosen, ""]
        + [f"targets (ours vs the peer's best, same source and KV cache; KL <= {KL_RATIO} x, top-1 >=, ppl <=):"]
        + _targets(results, picks)
        + [
            "",
            f"noise: ours / the peer's best, 95 % interval of a paired bootstrap over the "
            f"held-out windows ({BOOTSTRAP} resamples)",
            *_noise(results, picks),
        ]
    )
    print(text)
    (work / "results.txt").write_text(text + "\n")
    (work / "results.json").write_text(
        json.dumps(
            {
                "rows": [
                    {
                        "kind": r.kind,
                        "choice": r.choice,
                        "path": str(r.path),
                        "fp8_kv": r.fp8_kv,
                        "kv_one": r.kv_one,
                        "calib_seconds": r.calib_seconds,
                    }
                    for r in rows
                ],
                "results": results,
                "picks": {("fp8_kv" if kv else "bf16_kv"): list(pair) for kv, pair in picks.items()},
                "args": vars(args),
            },
            indent=1,
            default=str,
        )
    )
    _plot(results, rows, picks, work / "quality.png")
    print(f"\nwrote {work / 'results.txt'}, {work / 'results.json'}, {work / 'quality.png'}")


def _picks(results: dict, rows: list[Model]) -> dict[bool, tuple[int, int]]:
    """Per KV cache (False: BF16, True: FP8): (our row, the peer's best row), each the one of its side with the
    lowest mean KL on the validation split; held-out text never takes part in a choice. On an FP8 cache the
    scale-1.0 rows compete with the calibrated ones, so each side's k/v scales are chosen there too."""
    picks = {}
    for fp8_kv in (False, True):
        sides = (
            [i for i, r in enumerate(rows) if r.kind == "ray-calib" and r.fp8_kv == fp8_kv],
            [i for i, r in enumerate(rows) if r.kind == "llm-compressor" and r.fp8_kv == fp8_kv],
        )
        ours, peer = (min(side, key=lambda i: results[i][VALIDATION]["kl"]) for side in sides)
        picks[fp8_kv] = (ours, peer)
    return picks


def _targets(results: dict, picks: dict[bool, tuple[int, int]]) -> list[str]:
    verdicts = []
    rng = _rng()
    for fp8_kv, (ours, peer) in picks.items():
        for source in SOURCES:
            a, b = results[ours][source], results[peer][source]
            ppl = _ratios(results, ours, peer, source, rng)["ppl"] if "windows" in a else None
            tie = ppl is not None and ppl[1] <= 1.0 <= ppl[2]
            checks = {
                "KL": a["kl"] <= KL_RATIO * b["kl"],
                "top-1": a["top1"] >= b["top1"],
                "ppl": a["ppl"] <= b["ppl"] or tie,
            }
            mark = "met" if all(checks.values()) else "MISSED " + ", ".join(k for k, ok in checks.items() if not ok)
            tied = " (tie: the ratio interval holds 1.0)" if tie and a["ppl"] > b["ppl"] else ""
            verdicts.append(
                f"  {source:<12} {'FP8 KV' if fp8_kv else 'BF16 KV':<8} KL {a['kl']:.4f} vs "
                f"{KL_RATIO} x {b['kl']:.4f} = {KL_RATIO * b['kl']:.4f}; top-1 {a['top1']:.3f} vs "
                f"{b['top1']:.3f}; ppl {a['ppl']:.3f} vs {b['ppl']:.3f}{tied}: {mark}"
            )
    return verdicts


def _rng():
    import numpy as np

    return np.random.default_rng(0)


def _ratios(results: dict, ours: int, peer: int, source: str, rng) -> dict[str, tuple[float, float, float]]:
    """(point, 2.5 %, 97.5 %) of ours / peer for ppl and KL: both are scored on the same windows, so the
    windows are resampled together (paired) and the ratio recomputed each time."""
    import numpy as np

    a, b = (np.array(results[i][source]["windows"]) for i in (ours, peer))
    picked = rng.integers(0, len(a), size=(BOOTSTRAP, len(a)))
    sa, sb = a[picked].sum(axis=1), b[picked].sum(axis=1)  # [resample, (nll, n, kl, hits)]
    ppl = np.exp((sa[:, 0] - sb[:, 0]) / sa[:, 1])
    kl = sa[:, 2] / sb[:, 2]
    return {
        "ppl": (math.exp((a[:, 0].sum() - b[:, 0].sum()) / a[:, 1].sum()), *np.quantile(ppl, [0.025, 0.975])),
        "kl": (a[:, 2].sum() / b[:, 2].sum(), *np.quantile(kl, [0.025, 0.975])),
    }


def _noise(results: dict, picks: dict[bool, tuple[int, int]]) -> list[str]:
    """How much of a ppl/KL gap the choice of held-out passages alone could make."""
    rng = _rng()
    lines = []
    for fp8_kv, (ours, peer) in picks.items():
        for source in SOURCES:
            if "windows" not in results[ours][source]:
                return ["  (results.json of an older run: no per-window sums)"]
            ratios = _ratios(results, ours, peer, source, rng)
            (ppl, ppl_lo, ppl_hi), (kl, kl_lo, kl_hi) = ratios["ppl"], ratios["kl"]
            lines.append(
                f"  {source:<12} {'FP8 KV' if fp8_kv else 'BF16 KV':<8} ppl ratio {ppl:.4f} [{ppl_lo:.4f}, "
                f"{ppl_hi:.4f}]  KL ratio {kl:.3f} [{kl_lo:.3f}, {kl_hi:.3f}]  "
                f"({len(results[ours][source]['windows'])} windows)"
            )
    return lines


def _plot(results: dict, rows: list[Model], picks: dict[bool, tuple[int, int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [i for pair in picks.values() for i in pair]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (metric, title) in zip(
        axes,
        [
            ("kl", "mean KL vs BF16 (lower is better)"),
            ("top1", "top-1 agreement (higher is better)"),
            ("ppl", "perplexity (lower is better)"),
        ],
    ):
        width = 0.8 / len(shown)
        for k, index in enumerate(shown):
            row = rows[index]
            values = [results[index][s][metric] for s in SOURCES]
            ax.bar(
                [x + k * width for x in range(len(SOURCES))],
                values,
                width,
                label=f"{row.label} ({'FP8' if row.fp8_kv else 'BF16'} KV)",
                color=("tab:blue" if row.kind == "ray-calib" else "tab:orange"),
                alpha=1.0 if row.fp8_kv else 0.55,
                hatch="//" if row.fp8_kv else None,
            )
        if metric == "ppl":
            ax.plot(
                [x + 0.4 - width / 2 for x in range(len(SOURCES))],
                [results[0][s]["ppl"] for s in SOURCES],
                "k_",
                markersize=30,
                label="BF16",
            )
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(SOURCES))], SOURCES)
        ax.set_title(title)
        if metric == "top1":
            ax.set_ylim(min(results[i][s]["top1"] for i in shown for s in SOURCES) - 0.02, 1.0)
        if metric == "ppl":
            low = min(results[i][s]["ppl"] for i in [0, *shown] for s in SOURCES)
            ax.set_ylim(low * 0.9, max(results[i][s]["ppl"] for i in shown for s in SOURCES) * 1.03)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct FP8: ray-calib vs llm-compressor's best recipe on held-out text")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
