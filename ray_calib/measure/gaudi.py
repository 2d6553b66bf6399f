"""The INC-native measurement on Gaudi: INC's own observers, our launch, our gather.

Gaudi's vLLM (vllm-gaudi / HabanaAI fork) measures through INC when `QUANT_CONFIG` points at a MEASURE
config and the model is loaded with `quantization="inc"`. INC reads QUANT_CONFIG when a worker starts
(DESIGN §6: the env is frozen at `ray start`), so it is set before vLLM starts: in this process for mp
ranks and in the Ray job's runtime_env for Ray ranks. Each rank dumps its files on its own node under
dump_stats_path; `finalize_calibration` in each rank writes them, and the ranks send the bytes back
over collective_rpc, so the head gets every rank's files without a shared file system.

This path needs Gaudi hardware and cannot run on the CI machine (CPU): it is exercised on Gaudi only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ray_calib import atomic
from ray_calib.errors import EngineError, MeasurementError
from ray_calib.measurements import MeasurementSet, RunMeta, write_meta
from ray_calib.measurements.naming import parse_name
from ray_calib.measure.preflight import ModelInfo
from ray_calib.rundir import MEASURE_PREFIX

# Where each node's INC dumps go: node-local, so two runs never meet and no NFS is needed.
NODE_DUMP_ROOT = "/tmp/ray-calib-inc"


def inc_measure_config(fp8_kv: bool, moe: bool, dump_dir: str, user_config: Path | None = None) -> dict:
    """The seeds' measure config, or the user's --quant-config, writing its stats under `dump_dir`."""
    from ray_calib.scales.quant_config import build_config, read_config

    dump_stats_path = f"{dump_dir}/{MEASURE_PREFIX}"
    if user_config is not None:
        return {**read_config(user_config), "mode": "MEASURE", "dump_stats_path": dump_stats_path}
    return build_config(measure=True, fp8_kv=fp8_kv, one_node=False, moe=moe, dump_stats_path=dump_stats_path)


def run_inc_measure(config, info: ModelInfo, calib, progress, started: float):
    """Measure with INC on Gaudi; write the gathered rank files, meta and summary like the CPU/CUDA path."""
    import json

    from ray_calib.engine.launch import EngineConfig, build_llm
    from ray_calib.measure.run import MeasureSummary, _versions, context_limit

    dump_dir = f"{NODE_DUMP_ROOT}/{os.getpid()}-{int(time.time())}"
    quant_config = inc_measure_config(config.fp8_kv, info.moe, dump_dir, config.quant_config)
    config_path = Path(dump_dir) / "inc_measure_config.json"
    env = {"QUANT_CONFIG": str(config_path), "PT_HPU_WEIGHT_SHARING": "0"}
    _write_everywhere(config_path, json.dumps(quant_config), config.ray_address)
    engine = EngineConfig(model=str(info.path), tp_size=config.tp_size, device="hpu", executor=config.executor,
                          ray_address=config.ray_address, max_model_len=context_limit(config, info),
                          max_num_seqs=config.batch_size, worker_extension_cls="ray_calib.measure.gaudi.IncExtension",
                          quantization="inc", kv_cache_dtype="fp8_inc" if config.fp8_kv else "auto", extra_env=env)
    llm = build_llm(engine)  # sets QUANT_CONFIG in this process and the Ray job env before vLLM starts
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=config.max_new_tokens, temperature=0.0)
    prompts = calib.token_ids
    progress.start(len(prompts), 0)
    generated = 0
    for start in range(0, len(prompts), config.batch_size):
        batch = prompts[start:start + config.batch_size]
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in batch], params, use_tqdm=False)
        new = sum(len(o.outputs[0].token_ids) for o in outputs)
        generated += new
        progress.advance(len(batch), sum(map(len, batch)) + new)
    per_rank = llm.collective_rpc("ray_calib_inc_finish", args=(f"{dump_dir}/{MEASURE_PREFIX}",))
    files = _write_gathered(config.out, per_rank)
    measurement = MeasurementSet.discover(config.out)
    meta = RunMeta(device_type=_gaudi_type(), model=info.model_id, revision=info.revision, dataset=str(config.dataset),
                   dataset_hash=calib.dataset_hash, num_samples=len(prompts),
                   num_tokens=calib.report.num_tokens + generated, tp_size=measurement.world_size, ep_size=None,
                   observer="maxabs", fp8_kv=config.fp8_kv, versions=_versions(), chunks_done=[0], chunks_total=1,
                   extra={"max_new_tokens": config.max_new_tokens, "executor": engine.resolved_executor, "inc": True})
    write_meta(config.out, meta)  # ep_size unknown: unify detects expert parallelism from INC's files
    first = measurement.read(0, check_npz=False)
    return MeasureSummary(out=config.out, world_size=measurement.world_size, executor=engine.resolved_executor,
                          device="hpu", num_prompts=len(prompts), num_tokens=meta.num_tokens, generated_tokens=generated,
                          chunks_total=1, chunks_reused=0, seconds=time.perf_counter() - started,
                          nodes_per_rank=len(first.nodes), data_summary=calib.report.summary(), files=files)


def _gaudi_type() -> str:
    from ray_calib.engine.device import device_type

    return device_type("hpu")


def _write_everywhere(path: Path, text: str, ray_address: str | None) -> None:
    """The QUANT_CONFIG file on this node and, for a Ray run, on every alive node (one Ray task per node)."""
    atomic.write_text(path, text)
    if not ray_address:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        ray.init(address=ray_address, log_to_driver=False)

    @ray.remote(num_cpus=0)
    def write(p: str, t: str) -> None:
        atomic.write_text(p, t)

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    ray.get([write.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(str(path), text)
             for node in nodes])


def _write_gathered(out: Path, per_rank: list[dict[str, bytes]]) -> list[Path]:
    written = []
    for files in per_rank:
        for name, data in files.items():
            if parse_name(name) is None or "/" in name:
                raise MeasurementError(name, "is not an INC stats file name", fix="check the worker's dump directory.")
            written.append(atomic.write_bytes(out / name, data))
    if not written:
        raise EngineError("INC wrote no measurement files on any rank",
                          fix="check that vLLM runs with quantization='inc' and that QUANT_CONFIG reached the workers.")
    return written


class IncExtension:
    """Worker extension for the Gaudi path: finish INC's measurement and hand back this rank's files."""

    def ray_calib_inc_finish(self, dump_prefix: str) -> dict[str, bytes]:
        from neural_compressor.torch.quantization import finalize_calibration

        finalize_calibration(self.model_runner.model)
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        directory, prefix = Path(dump_prefix).parent, Path(dump_prefix).name
        found = {}
        for path in directory.iterdir():
            parsed = parse_name(path)
            if parsed and parsed[0].prefix == prefix and parsed[0].method is None and \
                    (parsed[0].rank, parsed[0].world_size) in ((rank, world), (None, None)):
                found[path.name] = path.read_bytes()
        return found
