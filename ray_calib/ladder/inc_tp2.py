"""Rung b: INC MEASURE inside vLLM on one node at TP 2, on a tiny dense model made on the spot.

The real `ray-calib measure` (INC backend: on Gaudi natively, on CPU through RAY_CALIB_INC_ON_CPU, which does
in vLLM's CPU workers what vllm-gaudi's model runner does) runs as a subprocess with the mp executor; the rung
then asks INC's own question: did `finalize_calibration` leave exactly one rank file per rank, named
`_<rank>_<world>`? (An INC that names files by node-local rank, or a rank that never dumped, fails here in
minutes instead of at unify after an hour.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ray_calib.cluster import devices
from ray_calib.inc.naming import JSON, NPZ, parse_name
from ray_calib.ladder.run import LadderContext, RungFailed

WORLD = 2
STEP_TIMEOUT_S = 900  # a tiny model's vLLM start at TP 2 takes about a minute on a busy 2-core box
INC_ON_CPU = {"RAY_CALIB_INC_ON_CPU": "1"}


def run_inc_tp2(context: LadderContext) -> str:
    config = devices.load(context.conf)
    host = config.head.label
    work = rung_b_dir(context)
    model, out = work / "tiny-llama", work / "measure"
    env = rung_env(config.head.device_kind)
    calib = make_inputs(host, work, "llama", model, env)
    measure = measure_args(model, calib, out, config.head.device_kind)
    run_step(host, work, "measure", measure, {**env, "RAY_CALIB_RUN_DIR": str(work)})
    return check_rank_files(out, WORLD, host)


def rung_b_dir(context: LadderContext) -> Path:
    """Where rung b keeps its model, calibration set and measurements (rung f reuses them)."""
    return context.run_dir / "ladder" / "b-inc-tp2"


def rung_b_output(context: LadderContext, rungs: str) -> tuple[str, str, Path, Path]:
    """(head label, device kind, measurements, tiny model) rung b left for a later rung; refused without them."""
    head = devices.load(context.conf).head
    source = rung_b_dir(context)
    measure = source / "measure"
    if not (measure / "ray_calib_meta.json").is_file():
        raise RungFailed(
            head.label, f"no measurements of rung b in {measure}", fix=f"run rung b first (--rungs {rungs})."
        )
    return head.label, head.device_kind, measure, source / "tiny-llama"


def rung_env(kind: str, *, inc_on_cpu: bool = True) -> dict[str, str]:
    """The user's env without a Ray address (these rungs are one node, mp), INC in vLLM's CPU workers on CPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_CALIB_DEVICE", *INC_ON_CPU)}
    return {**env, **(INC_ON_CPU if kind == "cpu" and inc_on_cpu else {}), "PYTHONUNBUFFERED": "1"}


def make_inputs(host: str, work: Path, arch: str, model: Path, env: dict[str, str]) -> Path:
    """A tiny `arch` model made at `model` and a calibration set of four short prompts (returned) in `work`."""
    calib = work / "calib.jsonl"
    run_step(host, work, "make-tiny-model", ["--arch", arch, "--out", model, "--force"], env)
    run_step(host, work, "make-calib-set", ["--format", "pile", "--out", calib, "-n", "4"], env)
    return calib


def measure_args(model: Path, calib: Path, out: Path, kind: str, *, tp: int = WORLD, executor: str = "mp") -> list:
    """`ray-calib measure` of a tiny model at TP `tp` (on this node with mp): four short prompts, one token each."""
    measure = ["-m", model, "-d", calib, "-t", str(tp), "-n", "4", "-l", "24", "--max-new-tokens", "1"]
    return measure + ["--executor", executor, "-o", out, "--force", "--device", _device(kind)]


def _device(kind: str) -> str:
    return {"hpu": "auto", "cpu": "cpu", "cuda": "cuda"}.get(kind, "auto")


def run_step(host: str, work: Path, command: str, args: list, env: dict[str, str]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"{command}.log"
    with open(log, "wb") as handle:
        proc = subprocess.run(
            [sys.executable, "-m", "ray_calib.cli", command, *map(str, args)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=STEP_TIMEOUT_S,
        )
    if proc.returncode != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if ln.startswith("error: ")), lines[-1] if lines else "no output")
        raise RungFailed(host, f"`ray-calib {command}` exited {proc.returncode}: {last[:300]}", fix=f"see {log}.")


def check_rank_files(directory: Path, world: int, host: str) -> str:
    """Exactly ranks 0..world-1 of `world`, each with its .json and .npz, and nothing else."""
    found: dict[int, set[str]] = {}
    for path in sorted(directory.glob("*")):
        parsed = parse_name(path)
        if parsed is None or parsed[0].method is not None:
            continue
        name, kind = parsed
        if name.rank is None or name.world_size != world:
            raise RungFailed(
                host,
                f"INC wrote {path.name}, not a file per rank named _<rank>_{world}",
                fix="use an INC that names dumps by global rank (neural-compressor >= 3.5 reads RANK at dump time).",
            )
        found.setdefault(name.rank, set()).add(kind)
    missing = [r for r in range(world) if not {JSON, NPZ} <= found.get(r, set())]
    if missing:
        raise RungFailed(
            host,
            f"no complete rank file for rank(s) {', '.join(map(str, missing))} of {world} in {directory} "
            f"(found ranks {sorted(found) or 'none'})",
            fix="that rank did not reach finalize_calibration: see the measure log beside it.",
        )
    return f"INC MEASURE at TP {world}: one rank file per rank (_0_{world} .. _{world - 1}_{world}) in {directory}"
