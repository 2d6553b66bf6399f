"""The ladder: rungs of a few minutes each, run in order, stopping at the first that fails.

Why: a real calibration of a large model takes an hour and fails late (a version skew, another copy of the
model on one node, a rank file missing). Each rung asks one of those questions on the user's own cluster in
minutes, and a failure names the rung, the host, the evidence and the fix. The result is a table (rung,
seconds, result) printed and written to `<run dir>/ladder/` (ladder.txt, ladder.json).

    a  nodes   every node: versions equal to the head's, devices (hl-smi on Gaudi), free RAM/disk (and HBM on
               Gaudi), the model at the same path with the same config.json and shards
    b  inc-tp2 one node, TP 2, a tiny dense model made on the spot: INC MEASURE inside vLLM, finalize, one
               rank file per rank named _<rank>_<world>
    c  all-reduce  one process per node over SSH joins a torch.distributed group at the head (gloo on CPU,
               HCCL on Gaudi) with the node's IFNAME and all-reduces once; then, when `up` started the conf's
               cluster, INC MEASURE of a tiny model at the full TP over Ray, its rank files gathered to the head
    d  inc-ep  one node, TP 2 with expert parallelism, a tiny DeepSeek made on the spot: each rank's own experts
               in its rank file, ep_size in the meta, all experts back after `unify --to-tp 1`
    e  inc-quantize  rung b's files unified to one rank (`unify`), the one-node QUANT_CONFIG `quantize` writes
               for them, loaded by INC QUANTIZE for one short generation (vllm-gaudi; INC in vLLM's CPU workers)
    f  compressed-tensors  rung b's measurements written by `quantize --format compressed-tensors` for this
               Gaudi type and loaded by `infer` for one short generation (vllm-gaudi; vLLM on CPU)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ray_calib import atomic
from ray_calib.errors import RayCalibError


class RungFailed(RayCalibError):
    """A rung's question got the wrong answer on `host`: `evidence` is what was seen, `fix` what to do."""

    def __init__(self, host: str, evidence: str, *, fix: str) -> None:
        self.host, self.evidence = host, evidence
        super().__init__(f"{host}: {evidence}", fix=fix)


@dataclass(frozen=True)
class Rung:
    letter: str
    name: str
    question: str
    run: Callable[[LadderContext], str]  # returns the evidence of success; raises RungFailed


@dataclass
class LadderContext:
    conf: Path
    model: Path | None
    run_dir: Path
    accept_new_host_keys: bool = False


@dataclass(frozen=True)
class RungResult:
    rung: str  # "a nodes"
    seconds: float
    ok: bool
    result: str  # the evidence (ok) or "<host>: <evidence>" (failed)
    fix: str | None = None


def run_ladder(rungs: list[Rung], context: LadderContext) -> list[RungResult]:
    """Run `rungs` in order; the first failure ends the ladder (later rungs would fail for the same reason)."""
    results = []
    for rung in rungs:
        started = time.monotonic()
        try:
            evidence = rung.run(context)
        except RungFailed as failed:
            results.append(
                RungResult(f"{rung.letter} {rung.name}", time.monotonic() - started, False, failed.message, failed.fix)
            )
            break
        results.append(RungResult(f"{rung.letter} {rung.name}", time.monotonic() - started, True, evidence))
    return results


HEADER = ("rung", "seconds", "result")


def rows(results: list[RungResult]) -> list[tuple[str, str, str]]:
    return [(r.rung, f"{r.seconds:.1f}", ("ok: " if r.ok else "FAILED: ") + r.result) for r in results]


def write_results(run_dir: Path, results: list[RungResult]) -> Path:
    """<run dir>/ladder/ladder.txt (the table) and ladder.json (every field); returns the text file."""
    out = run_dir / "ladder"
    table = rows(results)
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(HEADER)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [HEADER, *table]]
    lines += [f"fix: {r.fix}" for r in results if r.fix]
    atomic.write_json(out / "ladder.json", [asdict(r) for r in results])
    return atomic.write_text(out / "ladder.txt", "\n".join(lines) + "\n")
