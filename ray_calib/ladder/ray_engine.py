"""Rung c, second half: the engine at the cluster's full TP over Ray, its rank files gathered to the head.

Run when `ray-calib up` started this devices.conf's cluster (a ladder run before `up` stops at the
all-reduce and says so): a tiny model made on the spot is copied to every node at the same path over SFTP,
then the real `ray-calib measure` runs it at TENSOR_PARALLEL_SIZE (every card of every node) over Ray with
INC (INC MEASURE in vllm-gaudi on Gaudi; INC in vLLM's CPU workers here), and the rung asks for exactly one
rank file per rank, 0..N-1, on the head. The tiny llama has 4 heads; TP 8 and 16 take the tiny DeepSeek-R1
shape (16 heads), whose MoE INC measures on Gaudi.
"""

from __future__ import annotations

from pathlib import Path

from ray_calib.cluster import state
from ray_calib.cluster.devices import ClusterConfig
from ray_calib.cluster.ssh import SSHRunner
from ray_calib.errors import ClusterError
from ray_calib.ladder.inc_tp2 import check_rank_files, make_inputs, measure_args, run_step, rung_env
from ray_calib.ladder.run import LadderContext, RungFailed

HEADS = {"llama": 4, "deepseek_r1": 16}  # attention heads of each tiny model (testing/tiny/model.py)


def cluster_up(config: ClusterConfig) -> bool:
    record = state.read(config.path)
    return bool(record and record.get("status") == "up")


def run_engine_over_ray(context: LadderContext, config: ClusterConfig) -> str:
    """Measure a tiny model at the conf's full TP over its Ray cluster; the evidence line on success."""
    host, kind, tp = config.head.label, config.head.device_kind, config.tensor_parallel_size
    arch = next((arch for arch, heads in HEADS.items() if heads % tp == 0), None)
    if arch is None:
        raise RungFailed(
            host,
            f"TENSOR_PARALLEL_SIZE {tp} divides no tiny model's heads ({HEADS})",
            fix="run rung c with a TENSOR_PARALLEL_SIZE of 1, 2, 4, 8 or 16.",
        )
    work = context.run_dir / "ladder" / "c-engine"
    model, out = work / f"tiny-{arch}", work / "measure"
    env = rung_env(kind)
    calib = make_inputs(host, work, arch, model, env)
    _copy_to_workers(context, config, model)
    measure = [*measure_args(model, calib, out, kind, tp=tp, executor="ray"), "--conf", config.path]
    run_step(host, work, "measure", measure, {**env, "RAY_CALIB_RUN_DIR": str(work)})
    check_rank_files(out, tp, host)
    return (
        f"INC MEASURE of a tiny {arch} at TP {tp} over Ray on {len(config.nodes)} nodes: ranks 0..{tp - 1} on the head"
    )


def _copy_to_workers(context: LadderContext, config: ClusterConfig, model: Path) -> None:
    """The model at the same path on every other node (vLLM loads it there); nodes sharing the head's disk too."""
    files = {path: path.read_bytes() for path in sorted(model.iterdir()) if path.is_file()}
    workers = [node for node in config.nodes if node is not config.head]
    with SSHRunner(config, accept_new_host_keys=context.accept_new_host_keys) as runner:

        def put_all(node) -> int:
            for path, data in files.items():
                runner.put(node, data, str(path))
            return len(files)

        results = runner.map(workers, put_all)
    for node in workers:
        error = results[node.name]
        if isinstance(error, ClusterError):
            raise RungFailed(node.label, f"cannot copy the tiny model: {error.detail}", fix=error.fix or "")
