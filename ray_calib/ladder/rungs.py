"""The rungs, in the order they run (see `ladder.run` for what each asks)."""

from __future__ import annotations

from ray_calib.errors import ConfigError
from ray_calib.ladder.allreduce import run_allreduce
from ray_calib.ladder.compressed import run_compressed
from ray_calib.ladder.inc_ep import run_inc_ep
from ray_calib.ladder.inc_quantize import run_inc_quantize
from ray_calib.ladder.inc_tp2 import run_inc_tp2
from ray_calib.ladder.nodes import run_nodes
from ray_calib.ladder.run import Rung

RUNGS = [
    Rung("a", "nodes", "versions, devices, memory, disk and the model equal on every node", run_nodes),
    Rung("b", "inc-tp2", "INC MEASURE in vLLM at TP 2 on one node: one rank file per rank", run_inc_tp2),
    Rung("c", "all-reduce", "one all-reduce across every node over its IFNAME (gloo / HCCL)", run_allreduce),
    Rung("d", "inc-ep", "a tiny MoE at TP 2 with expert parallelism: per-expert files, EP in the meta", run_inc_ep),
    Rung(
        "e",
        "inc-quantize",
        "rung b's files unified to one rank and loaded by INC QUANTIZE: generate",
        run_inc_quantize,
    ),
    Rung(
        "f",
        "compressed-tensors",
        "rung b's files as a Gaudi compressed-tensors checkpoint: load, generate",
        run_compressed,
    ),
]


def select(letters: str | None) -> list[Rung]:
    """The rungs named by `letters` ("a", "ab", "a,b"), in ladder order; all when None."""
    if letters is None:
        return list(RUNGS)
    wanted = {c for c in letters.lower() if c.isalpha()}
    known = {rung.letter for rung in RUNGS}
    unknown = sorted(wanted - known)
    if unknown or not wanted:
        raise ConfigError(
            f"--rungs {letters}: no rung {', '.join(unknown) or '(none given)'}",
            fix=f"use letters of {', '.join(sorted(known))}.",
        )
    return [rung for rung in RUNGS if rung.letter in wanted]
