"""The INC measurement backend (Gaudi): INC's own observers in every rank, our launch, chunks and gather.

vllm-gaudi measures through INC when `QUANT_CONFIG` names a MEASURE config in a rank's environment: its
model runner calls INC's `prepare` on the raw model after loading. INC reads QUANT_CONFIG when the rank
starts, so the file is written on every node and the variable set in the Ray job's env before vLLM starts.

After each chunk of prompts every rank dumps INC's stats (`finalize_calibration` on the model that
carries INC's config, `__hqt_config__`; vllm-gaudi wraps that model in an adapter, so the wrapper is
unwrapped first), reads its own files back and returns them over collective_rpc: the head gets every
rank's files without a shared file system, and the chunk store checkpoints them like any other backend.
INC's stats are cumulative, so chunks still merge exactly by max. At the end `shutdown_inc()` marks INC
finalized in each rank (vllm-gaudi would otherwise dump again at exit) and the node directories go.

The KV cache is always BF16 while measuring: INC in MEASURE writes unscaled values into the cache, so an
FP8 cache would be corrupted. `--fp8-kv` only unblocks the KV cache types in the measure config, so
INC records the K/V ranges a QUANTIZE config with an FP8 cache needs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ray_calib.engine import gaudi, nodes
from ray_calib.engine.launch import error_reason
from ray_calib.engine.nodes import NodeFacts
from ray_calib.errors import ConfigError, EngineError
from ray_calib.inc import ExpertCoverage
from ray_calib.inc.coverage import hits_from_ranges
from ray_calib.inc.naming import MEASURE_PREFIX, parse_name
from ray_calib.inc.quant_config import KV_TYPES, build_config, read_config
from ray_calib.measure.inc_cpu import INC_ON_CPU_ENV  # "1": INC in vLLM's CPU workers (tests)
from ray_calib.measure.preflight import ModelInfo, valid_tp_sizes
from ray_calib.measurements.postprocess import postprocess

NODE_DUMP_ROOT = "/tmp/ray-calib-inc"  # node-local: two runs never meet and no NFS is needed
CONFIG_FILE = "inc_measure_config.json"
EXTENSION_CLS = "ray_calib.measure.gaudi.IncExtension"


def inc_on_cpu() -> bool:
    return os.environ.get(INC_ON_CPU_ENV) == "1"


def measure_quant_config(
    fp8_kv: bool, info: ModelInfo, dump_dir: str, user_config: Path | None, on_cpu: bool = False
) -> dict[str, Any]:
    """The seeds' measure config, or the user's, writing its stats under `dump_dir`."""
    dump_stats_path = f"{dump_dir}/{MEASURE_PREFIX}"
    if user_config is not None:
        config = {**read_config(user_config), "mode": "MEASURE", "dump_stats_path": dump_stats_path}
        if fp8_kv and set((config.get("blocklist") or {}).get("types", [])) & set(KV_TYPES):
            raise ConfigError(
                f"{user_config}: --fp8-kv, but its blocklist blocks the KV cache types {KV_TYPES}",
                fix="drop --fp8-kv, or use a measure config with an empty blocklist 'types'.",
            )
    else:
        config = build_config(
            measure=True, fp8_kv=fp8_kv, one_node=False, moe=info.moe, dump_stats_path=dump_stats_path
        )
    if on_cpu:
        config["use_qdq"] = True  # INC's CPU path works in quantize-dequantize mode only
    return config


def hqt_model(model):
    """The object INC prepared (it carries `__hqt_config__`): the model itself, or inside vLLM's adapters."""
    seen = set()
    current = model
    while current is not None and id(current) not in seen:
        if hasattr(current, "__hqt_config__"):
            return current
        seen.add(id(current))
        current = getattr(current, "model", None) if not hasattr(current, "_orig_mod") else current._orig_mod
    raise EngineError(
        f"INC did not prepare this rank's model ({type(model).__name__} holds no INC config)",
        fix="QUANT_CONFIG did not reach the worker, or vLLM ran without INC; check the job env "
        "(ray-calib measure --dry-run) and that vllm-gaudi is installed on every node.",
    )


class IncExtension:
    """Worker extension of the INC backend (`LLM(worker_extension_cls=...)`), driven by collective_rpc."""

    model_runner: Any  # set by the vLLM worker this class is mixed into

    def ray_calib_install(self, fp8_kv: bool, block_names: list[str], block_types: list[str]) -> dict[str, Any]:
        """INC was applied at load by the platform; check it really is, and name this rank."""
        model = hqt_model(self.model_runner.model)
        config = model.__hqt_config__.cfg
        return {"rank": _rank(), "measure_file": str(config.get("measure_file", "")), "inc": True}

    def ray_calib_collect(self, reset: bool = True) -> dict[str, Any]:
        """Dump INC's stats so far (cumulative) and return this rank's range file as plain data."""
        from neural_compressor.torch.quantization import finalize_calibration

        model = hqt_model(self.model_runner.model)
        finalize_calibration(model)  # writes <measure_file>.{json,npz} and _mod_list.json; observers keep going
        return _read_own_files(model)

    def ray_calib_inc_finish(self) -> dict[str, Any]:
        """Finalize INC the platform's way (at most once per process), hand back the files, remove them."""
        runner = self.model_runner
        model = hqt_model(runner.model)
        if hasattr(runner, "shutdown_inc"):
            runner.shutdown_inc()  # vllm-gaudi: finalize_calibration(model.model), once, and marks it done
        else:
            from neural_compressor.torch.quantization import finalize_calibration

            finalize_calibration(model)
        result = _read_own_files(model)
        base = str(model.__hqt_config__.cfg["measure_file"])
        for suffix in (".json", ".npz", "_mod_list.json"):
            Path(base + suffix).unlink(missing_ok=True)
        return result


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _read_own_files(model) -> dict[str, Any]:
    """This rank's files, named by INC's own config (the rank and world INC wrote into the name)."""
    base = Path(str(model.__hqt_config__.cfg["measure_file"]))
    json_path = base.with_name(base.name + ".json")
    parsed = parse_name(json_path)
    if parsed is None:
        raise EngineError(
            f"INC wrote {json_path.name}, which is not an INC stats file name",
            fix="check dump_stats_path in the measure config.",
        )
    stats = json.loads(json_path.read_text())
    mod_list_path = base.with_name(base.name + "_mod_list.json")
    mod_list = json.loads(mod_list_path.read_text()) if mod_list_path.exists() else list(stats["Nodes"])
    extra = {k: v for k, v in stats.items() if k not in ("GlobalRank", "LocalRank", "Mode", "Nodes")}
    name = parsed[0]
    return {
        "rank": name.rank if name.rank is not None else 0,
        "world_size": name.world_size or 1,
        "nodes": stats["Nodes"],
        "mod_list": mod_list,
        "extra": extra,
    }


def dump_dir_for_run() -> str:
    return f"{NODE_DUMP_ROOT}/{os.getpid()}-{int(time.time())}"


class IncBackend:
    """The stages' INC hooks: files and checks on every node before vLLM, INC finalized and cleaned after."""

    name, label = "inc", "INC's MEASURE"

    def __init__(self, plan) -> None:
        self.plan = plan
        self.use_ray = plan.engine.resolved_executor == "ray"
        self.facts: list[NodeFacts] = []
        self.backends: dict[str, list[str]] = {}  # INC patches vLLM's modules itself: nothing to report

    def before_start(self) -> None:
        """Join Ray with the job env first, then write QUANT_CONFIG and check every node (model, device, memory)."""
        plan = self.plan
        self.facts = plan.probe_nodes(write=True)
        nodes.check_nodes(self.facts, str(plan.info.path), gaudi=plan.target.is_gaudi and not plan.target.forced)
        if plan.target.is_gaudi:
            self._check_fit()

    def _check_fit(self) -> None:
        plan, fit = self.plan, self.plan.fit
        probed = [f for f in self.facts if f.device_type]
        if probed and probed[0].device_type != plan.target.device_type:
            raise EngineError(
                f"this node is {plan.target.device_type} but node {probed[0].node} is {probed[0].device_type}",
                fix="run on one Gaudi generation, or pass the right --device.",
            )
        per_node = min([plan.engine.tp_size] + [f.cards for f in probed if f.cards]) if probed else fit.ranks_per_node
        cards = min([f.card_bytes for f in probed if f.card_bytes] or [fit.card_bytes])
        hosts = {f"{f.node} ({f.hostname})": f.mem_available for f in self.facts}
        plan.fit = gaudi.Fit(fit.weights_bytes, fit.tp_size, per_node, cards, hosts)
        total = sum(f.cards for f in probed) or None
        gaudi.check_fit(plan.fit, plan.route, valid_tp_sizes(plan.info), total)

    def install(self, llm) -> None:
        """Every rank must hold INC's prepared model, or QUANT_CONFIG never reached it."""
        try:
            llm.collective_rpc(
                "ray_calib_install", args=(self.plan.fp8_kv, self.plan.block_names, self.plan.block_types)
            )
        except EngineError:
            raise
        except Exception as err:  # the worker's EngineError arrives wrapped by vLLM/Ray
            raise EngineError(
                f"INC is not active in the ranks ({error_reason(err)})",
                fix="check QUANT_CONFIG in the job env with `ray-calib measure --dry-run`.",
            ) from err

    def check(self, rank_files: list) -> None:
        """INC decides what it measures from QUANT_CONFIG; its files are post-processed in `finish_rank_files`."""

    def finish(self, llm) -> None:
        llm.collective_rpc("ray_calib_inc_finish")

    def cleanup(self) -> None:
        if self.plan.dump_dir:
            nodes.remove_everywhere(self.plan.dump_dir, use_ray=self.use_ray)


def finish_rank_files(rank_files, coverage, ep_size: int):
    """INC's range files post-processed (cache-read matmuls, SDPA output), and which experts were hit.

    INC counts no tokens per expert; a routed expert that never got a token has a zero range in the fused
    MoE op's per-expert outputs, so coverage records 1 (hit) or 0 (never hit) per expert.
    """
    fixed, changed, mla = [], 0, False
    for rank_file in rank_files:
        new, report = postprocess(rank_file)
        fixed.append(new)
        changed += report.matmul_inputs_fixed + report.fsdpa_outputs_fixed
        mla |= report.mla
    hits = hits_from_ranges(fixed, expert_parallel=ep_size > 1)
    if hits:
        coverage = ExpertCoverage(experts=hits, num_tokens=coverage.num_tokens)
    extra: dict[str, object] = {"postprocessed": {"leaves_changed": changed, "mla": mla}}
    if hits:
        extra["coverage_basis"] = "per-expert range (1 = hit, 0 = never hit; INC counts no tokens)"
    return fixed, coverage, extra
