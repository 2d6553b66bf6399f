"""Rung d: a tiny MoE measured with expert parallelism at TP 2 on one node: per-expert files, EP in the meta.

Under expert parallelism each rank holds n_routed_experts / world of the experts and dumps only its own, and
unify must concatenate them in rank order instead of max-merging them. The real `ray-calib measure
--expert-parallel` runs on a tiny DeepSeek made on the spot (INC in vllm-gaudi on Gaudi; on CPU ray-calib's
observers in vLLM's CPU workers, since INC on CPU patches linear layers only, not the fused MoE op), then the
rung asks: one rank file per rank, ep_size = world in the meta, each rank holding its share of the experts
(a stack that ignored `enable_expert_parallel` leaves every rank with all of them), and `unify --to-tp 1`
giving back every routed expert of every MoE layer.
"""

from __future__ import annotations

import json

from ray_calib.cluster import devices
from ray_calib.inc import read_meta
from ray_calib.inc.experts import expert_layout
from ray_calib.inc.runset import MeasurementSet
from ray_calib.ladder.inc_tp2 import WORLD, check_rank_files, make_inputs, measure_args, run_step, rung_env
from ray_calib.ladder.run import LadderContext, RungFailed

EP_FLAG = "--expert-parallel"  # what the rung asks measure for


def run_inc_ep(context: LadderContext) -> str:
    config = devices.load(context.conf)
    host, kind = config.head.label, config.head.device_kind
    work = context.run_dir / "ladder" / "d-inc-ep"
    model, out, unified = work / "tiny-moe", work / "measure", work / "unified"
    env = rung_env(kind, inc_on_cpu=False)  # INC on CPU has no patched module for vLLM's fused MoE op
    calib = make_inputs(host, work, "deepseek_v3", model, env)
    measure = [*measure_args(model, calib, out, kind), EP_FLAG]
    run_step(host, work, "measure", measure, {**env, "RAY_CALIB_RUN_DIR": str(work)})
    check_rank_files(out, WORLD, host)
    routed = json.loads((model / "config.json").read_text())["n_routed_experts"]
    local = check_expert_parallel(out, WORLD, routed, host)
    run_step(host, work, "unify", ["--to-tp", "1", "--in", out, "--out", unified, "--force"], env)
    merged = expert_layout(MeasurementSet.discover(unified).read(0, check_npz=False)).local_experts
    if merged != routed:
        raise RungFailed(
            host,
            f"`unify --to-tp 1` of the expert-parallel files holds {merged} experts per MoE layer, not {routed}",
            fix="unify these files with --expert-parallel (the meta's ep_size decides it otherwise).",
        )
    return (
        f"MoE at TP {WORLD} with EP {WORLD}: {local} of {routed} experts per rank, ep_size {WORLD} in the meta, "
        f"unified to TP 1 with all {routed}"
    )


def check_expert_parallel(directory, world: int, routed: int, host: str) -> int:
    """Each rank holds routed / world experts and the meta says ep_size = world; returns the experts per rank."""
    measurement = MeasurementSet.discover(directory)
    meta = read_meta(directory)
    counts = [expert_layout(measurement.read(r, check_npz=False)).local_experts for r in range(world)]
    if any(count != routed // world for count in counts):
        how = "all of them: the engine ran TP-sharded experts" if set(counts) == {routed} else "a wrong share"
        raise RungFailed(
            host,
            f"with {EP_FLAG} at TP {world}, ranks hold {counts} of {routed} routed experts ({how}), "
            f"not {routed // world} each",
            fix="use a vLLM / vllm-gaudi that honours enable_expert_parallel, and an INC that dumps each rank's "
            "own experts.",
        )
    if meta is None or meta.ep_size != world:
        raise RungFailed(
            host,
            f"{directory}: the files are expert parallel but the meta says ep_size "
            f"{meta.ep_size if meta else '(no ray_calib_meta.json)'}, not {world}",
            fix="unify would max-merge different experts: re-measure with this ray-calib.",
        )
    return counts[0]
