"""Stage 1 of a measurement: every decision made before anything starts, in one printable plan.

    target     the device (hl-smi on Gaudi, never a card opened), or --device / RAY_CALIB_DEVICE
    backend    INC's own MEASURE in every rank on Gaudi; our observers on CPU/CUDA
    EP         one decision: --expert-parallel, default on for MoE models measured by INC
    engine     EngineConfig (arguments, env, executor) and the QUANT_CONFIG the ranks read
    fit        Gaudi: HBM per card and host RAM per node for the checkpoint route
    nodes      from devices.conf: which ranks run where, with which node env

`measure --dry-run` prints it; `run_measure` runs exactly it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_calib.cluster import devices, state
from ray_calib.cluster.envfiles import lint_conf
from ray_calib.data import load_prompts
from ray_calib.engine import gaudi, nodes, sizing
from ray_calib.engine.device import GiB, Target, detect_target, local_device_count
from ray_calib.engine.launch import EngineConfig, connect_ray, prepare, timeout_env
from ray_calib.engine.memory import memory_check
from ray_calib.engine.plan import EnginePlan, NodePlan, local_node, nodes_from_conf, with_copy_list
from ray_calib.errors import ConfigError
from ray_calib.inc.quant_config import quantizes_kv_cache
from ray_calib.measure.extension import EXTENSION_CLS as OBSERVERS_EXTENSION
from ray_calib.measure.gaudi import CONFIG_FILE, dump_dir_for_run, inc_on_cpu, measure_quant_config
from ray_calib.measure.gaudi import EXTENSION_CLS as INC_EXTENSION
from ray_calib.measure.inc_cpu import INC_ON_CPU_ENV
from ray_calib.measure.preflight import (
    ModelInfo,
    blocklist,
    check_attention_backend,
    check_tp,
    resolve_model,
    valid_tp_sizes,
)
from ray_calib.model.config import model_config

OBSERVERS, INC = "observers", "inc"
DEFAULT_MAX_MODEL_LEN = 2048  # calibration prompts are short; a long context only costs KV cache


@dataclass
class MeasurePlan:
    info: ModelInfo
    target: Target
    backend: str
    ep_size: int
    fp8_kv: bool  # the K/V written to the cache are measured
    engine: EngineConfig = field(init=False)  # decided from the rest of the plan (`_engine`)
    block_names: list[str]
    block_types: list[str]
    hessians: bool | None = False  # linear inputs' sum(x xᵀ) for GPTQ rounding; None: when they fit
    quant_config: dict[str, Any] | None = None
    dump_dir: str | None = None
    route: Any = None  # engine.gaudi.Route on Gaudi
    fit: Any = None  # engine.gaudi.Fit on Gaudi
    nodes: list[NodePlan] = field(default_factory=list)
    calib: Any = None  # data.CalibrationSet when loaded
    warnings: list[str] = field(default_factory=list)
    conf: Any = None  # cluster.devices.ClusterConfig when one is in use
    sampling: str = ""
    node_facts: list = field(default_factory=list)  # engine.nodes.NodeFacts once the nodes were probed
    checks: list[str] = field(default_factory=list)  # what the probe found, per node

    @property
    def quant_config_path(self) -> str | None:
        return f"{self.dump_dir}/{CONFIG_FILE}" if self.dump_dir else None

    def engine_plan(self) -> EnginePlan:
        info = self.info
        experts = f"MoE, {info.num_experts} routed experts" if info.moe else "dense"
        facts = [
            ("model", f"{info.path} ({info.model_type or '?'}; {experts}{'; MLA' if info.mla else ''})"),
            (
                "device",
                f"{self.target.device_type} [{self.target.device}]"
                + (f", {self.target.memory_bytes / GiB:.0f} GiB per device" if self.target.memory_bytes else "")
                + f" ({self.target.source})",
            ),
        ]
        if self.route is not None:
            facts.append(("route", f"{self.route.name}: {self.route.description}"))
        backend = (
            "INC MEASURE in every rank (QUANT_CONFIG), BF16 KV cache"
            if self.backend == INC
            else "ray-calib observers (vLLM worker extension)"
        )
        facts.append(("backend", f"{backend}; K/V ranges recorded: {'yes' if self.fp8_kv else 'no'}"))
        facts.append(
            (
                "parallel",
                f"TP {self.engine.tp_size}, EP {self.ep_size}"
                f"{' (enable_expert_parallel)' if self.ep_size > 1 else ''}, executor "
                f"{self.engine.resolved_executor}",
            )
        )
        facts.append(("sampling", self.sampling))
        if self.calib is not None:
            facts.append(("data", self.calib.report.summary()))
        if self.fit is not None:
            facts.append(("memory", "\n".join(self.fit.lines())))
        if self.checks:
            facts.append(("nodes", "\n".join(self.checks)))
        return EnginePlan(
            title="ray-calib measure --dry-run: nothing is started, no device is opened",
            facts=facts,
            engine=self.engine,
            quant_config=self.quant_config,
            quant_config_path=self.quant_config_path,
            nodes=self.nodes,
            warnings=self.warnings,
        )

    def probe_nodes(self, *, write: bool) -> list:
        """Facts of every node of the run (Ray: joined with the run's job env first); `write` the QUANT_CONFIG."""
        use_ray = self.engine.resolved_executor == "ray"
        if use_ray:
            connect_ray(self.engine)  # the first Ray call: vLLM copies this job's env to every rank
        path = self.quant_config_path
        files = {path: quant_config_text(self)} if write and self.quant_config and path else {}
        gaudi = self.target.is_gaudi and not self.target.forced
        self.node_facts = nodes.probe(str(self.info.path), files, gaudi=gaudi, use_ray=use_ray)
        self.checks = [_describe(f) for f in self.node_facts]
        return self.node_facts


def plan_measure(config, *, load_data: bool = True, dry_run: bool = False) -> MeasurePlan:
    """Decide everything for `config` (a run.MeasureConfig) without starting vLLM or opening a device."""
    info = resolve_model(config.model, weights=not dry_run)
    sizing.check_max_model_len(info.shape, config.max_model_len, info.model_id)
    if config.tp_size is not None:
        check_tp(info, config.tp_size)
    target = detect_target(config.device)
    _check_conf_device(config.cluster_conf, target)
    backend = INC if target.is_gaudi or inc_on_cpu() else OBSERVERS
    if backend == OBSERVERS:
        check_attention_backend(config.attention_backend)
        config.tp_size = _choose_tp(config, info, target.device, join_ray=not dry_run)
    elif config.tp_size is None:  # Gaudi: HBM per card and host RAM per node are checked on the nodes
        config.tp_size = 1
    if backend == INC and config.min_expert_tokens > 1:
        raise ConfigError(
            f"--min-expert-tokens {config.min_expert_tokens}: INC counts no tokens per expert, only "
            "whether an expert got any (a non-zero range)",
            fix="use --min-expert-tokens 1 (or 0).",
        )
    ep_size = _ep_size(config, info, backend)
    conf = _conf(config)
    local_cards = _local_gaudi_cards(config, target, conf)
    if local_cards is not None and config.tp_size > local_cards and not dry_run:
        sizing.check_device_count(info.shape, config.tp_size, local_cards, "this node (hl-smi, no Ray cluster)")
    dump_dir = quant = route = None
    if backend == INC:
        dump_dir = dump_dir_for_run()
        quant = measure_quant_config(config.fp8_kv, info, dump_dir, config.quant_config, on_cpu=not target.is_gaudi)
        section = quant.get("blocklist") or {}
        names, types = list(section.get("names", [])), list(section.get("types", []))
        fp8_kv, hessians = quantizes_kv_cache(quant), False
        if config.hessians:
            raise ConfigError(
                "--hessians: INC measures on Gaudi and records no input second moments",
                fix="drop --hessians (Gaudi keeps INC's round-to-nearest), or measure on CPU/CUDA.",
            )
    else:
        names, types = blocklist(config.quant_config, fp8_kv=config.fp8_kv, moe=info.moe)
        fp8_kv, hessians = config.fp8_kv, config.hessians
    plan = MeasurePlan(
        info=info,
        target=target,
        backend=backend,
        ep_size=ep_size,
        fp8_kv=fp8_kv,
        hessians=hessians,
        block_names=names,
        block_types=types,
        quant_config=quant,
        dump_dir=dump_dir,
        conf=conf,
    )
    if target.is_gaudi:
        plan.route = route = gaudi.route_for(model_config(info.path), str(info.path))
    plan.engine = _engine(config, plan)
    plan.nodes = nodes_from_conf(conf, config.tp_size) if conf else local_node(config.tp_size)
    if target.is_gaudi:
        plan.fit = _fit(config, plan, route)
    plan.warnings = _warnings(plan)
    if local_cards is not None and config.tp_size > local_cards:
        plan.warnings.append(
            f"--tp {config.tp_size} without a Ray cluster runs every rank on this node, which has {local_cards} "
            "Gaudi cards (hl-smi): a real run refuses it (ray-calib up, then measure --conf)"
        )
    plan.sampling = (
        f"--num-samples {config.num_samples}, --least-tokens {config.least_tokens or '-'}, "
        f"--batch-size {config.batch_size}, --max-new-tokens {config.max_new_tokens}, "
        f"--chunk-size {config.chunk_size}; devices.conf {plan.conf.path if plan.conf else '-'}"
    )
    if load_data and config.dataset is not None:
        plan.calib = load_prompts(
            config.dataset,
            info.path,
            config.dataset_format,
            num_samples=config.num_samples,
            least_tokens=config.least_tokens,
        )
    return plan


def _local_gaudi_cards(config, target, conf) -> int | None:
    """Cards on this node when every rank runs here (Gaudi, no Ray cluster); None when not known or not local."""
    if not target.is_gaudi or conf is not None or config.ray_address or config.executor == "ray":
        return None
    return local_device_count("hpu")


def _choose_tp(config, info: ModelInfo, device: str, *, join_ray: bool) -> int:
    """--tp checked against the heads/experts, the devices (joining the Ray cluster now, so a cluster too
    small fails before any prompt is read) and memory; without --tp the smallest TP that fits."""
    devices = None
    if join_ray:
        devices = prepare(
            EngineConfig(
                model=str(info.path),
                tp_size=config.tp_size or 1,
                device=device,
                executor=config.executor,
                ray_address=config.ray_address,
                max_model_len=context_limit(config, info),
                kv_cache_gib=config.kv_cache_gib,
                worker_extension_cls=OBSERVERS_EXTENSION,
                observe_weights=True,
            )
        )
    where = "the Ray cluster" if devices is not None else "this node"
    return sizing.choose_tp(
        info.shape,
        config.tp_size,
        model_id=info.model_id,
        devices=sizing.Devices(devices if devices is not None else local_device_count(device), where),
        memory=memory_check(info.path, valid_tp_sizes(info), device, config.kv_cache_gib, measure=True),
    )


def _ep_size(config, info: ModelInfo, backend: str) -> int:
    """Expert parallelism: on for MoE models measured by INC unless --no-expert-parallel; never for dense."""
    wanted = config.expert_parallel
    if wanted and not info.moe:
        raise ConfigError(f"--expert-parallel: {info.model_id} has no routed experts", fix="drop --expert-parallel.")
    if wanted is None:
        wanted = backend == INC and info.moe
    return config.tp_size if wanted else 1


def _check_conf_device(conf_path, target: Target) -> None:
    """devices.conf says Gaudi but this machine shows none: its generation (FP8 range, HBM) is not guessed."""
    if conf_path is None or target.is_gaudi or target.forced:  # --device cpu on an hpu conf is the user's word
        return

    conf = devices.load(conf_path)
    if conf.head.device_kind == "hpu":
        raise ConfigError(
            f"{conf.path}: DEVICE_KIND=hpu, but this machine shows no Gaudi ({target.device_type}, "
            f"{target.source}) to read the generation from, and gaudi2 and gaudi3 differ in FP8 range and HBM",
            fix="pass --device gaudi2 or --device gaudi3.",
        )


def _conf(config):
    if config.cluster_conf is None:
        return None

    return devices.load(config.cluster_conf)


def _engine(config, plan: MeasurePlan) -> EngineConfig:

    common = dict(
        model=str(plan.info.path),
        tp_size=config.tp_size,
        device=plan.target.device,
        executor=config.executor,
        ray_address=config.ray_address,
        max_model_len=context_limit(config, plan.info),
        max_num_seqs=config.batch_size,
        kv_cache_gib=config.kv_cache_gib,
    )
    if plan.backend == OBSERVERS:
        return EngineConfig(
            **common,
            worker_extension_cls=OBSERVERS_EXTENSION,
            observe_weights=True,
            extra_env=timeout_env(config.timeout_s),
            attention_backend=config.attention_backend,
            enable_expert_parallel=plan.ep_size > 1,
        )
    quant_config = plan.quant_config_path
    assert quant_config is not None, "an INC plan has a dump dir"
    if plan.target.is_gaudi:
        env = gaudi.engine_env(
            measure=True,
            tp_size=config.tp_size,
            route=plan.route,
            quant_config=quant_config,
            timeout_s=config.timeout_s,
            expert_parallel=plan.ep_size > 1,
        )
        return EngineConfig(
            **common,
            worker_extension_cls=INC_EXTENSION,
            quantization=plan.route.quantization,
            kv_cache_dtype="auto",
            extra_env=with_copy_list(env),
            enforce_eager=config.enforce_eager,
            trust_remote_code=True,
            enable_expert_parallel=plan.ep_size > 1,
        )

    env = {
        "QUANT_CONFIG": quant_config,
        INC_ON_CPU_ENV: "1",
        "INC_TARGET_DEVICE": "cpu",
        **timeout_env(config.timeout_s),
    }
    return EngineConfig(
        **common,
        worker_extension_cls=INC_EXTENSION,
        extra_env=with_copy_list(env),
        trust_remote_code=True,
        enable_expert_parallel=plan.ep_size > 1,
    )


def _fit(config, plan: MeasurePlan, route):
    per_node = max((len(n.ranks) for n in plan.nodes), default=config.tp_size)
    hosts: dict[str, int | None] = {n.name: None for n in plan.nodes if n.ranks}
    assert plan.target.memory_bytes is not None, "a Gaudi target knows its HBM"
    return gaudi.Fit(
        weights_bytes=gaudi.checkpoint_bytes(plan.info.path, route),
        tp_size=config.tp_size,
        ranks_per_node=per_node,
        card_bytes=plan.target.memory_bytes,
        hosts=hosts,
    )


def _warnings(plan: MeasurePlan) -> list[str]:
    warnings = []
    if plan.conf is not None:
        warnings += lint_conf(plan.conf)
        ifnames = {n.ifname for n in plan.conf.nodes if n.ifname}
        leaked = [v for v in ("GLOO_SOCKET_IFNAME", "HCCL_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if os.environ.get(v)]
        if len(ifnames) > 1 and leaked:
            warnings.append(
                f"this shell sets {', '.join(leaked)}={os.environ[leaked[0]]}, but the nodes use different "
                f"interfaces ({', '.join(sorted(ifnames))}); vLLM's legacy Ray executor copies the "
                "driver's value to every rank: unset it before `ray-calib measure`"
            )
        total = sum(len(n.ranks) for n in plan.nodes)
        if total < plan.engine.tp_size:
            warnings.append(f"devices.conf lists {total} devices for TP {plan.engine.tp_size}")
    if os.environ.get("VLLM_TRACE_FUNCTION") == "1":
        warnings.append("VLLM_TRACE_FUNCTION=1 in this shell: every rank would trace each Python call")
    if plan.fit is not None:
        warnings += [f"does not fit: {problem}" for problem in plan.fit.problems()]
        warnings += _one_node_serving(plan)
    if plan.backend == INC and not plan.target.is_gaudi:
        warnings.append(
            "INC runs in vLLM's CPU workers (RAY_CALIB_INC_ON_CPU=1): linear layers only, "
            "quantize-dequantize mode; not a Gaudi run"
        )
    return warnings


def _one_node_serving(plan: MeasurePlan) -> list[str]:
    """Measured across nodes on Gaudi: will the same checkpoint serve on one node (one card per rank, the
    fork's 16k context)? Said now, not after the hour of measuring (a BF16 DeepSeek-R1 fits 16 cards, not 8)."""
    cards = plan.conf.head.devices if plan.conf else None
    if not cards or plan.engine.tp_size <= cards or plan.route is None or plan.target.memory_bytes is None:
        return []
    kv = gaudi.kv_need(model_config(plan.info.path), cards, plan.fp8_kv, gaudi.SERVE_CONTEXT)
    fit = gaudi.serve_fit(
        plan.info.path,
        plan.route,
        tp_size=cards,
        moe=plan.info.moe,
        card_bytes=plan.target.memory_bytes,
        host_available=None,
        kv=kv,
    )
    return [
        f"measured at TP {plan.engine.tp_size}, this checkpoint ({plan.route.name}) will not serve on one node at "
        f"TP {cards}: {problem}; serve the model's FP8 checkpoint on one node (`infer -m <its FP8 dir>`) or serve "
        "across nodes (`infer --serve --conf`)"
        for problem in fit.problems()
    ]


def _describe(facts) -> str:
    model = f"model found ({facts.model_digest})" if facts.model_found else "MODEL MISSING"
    memory = f"{facts.mem_available / GiB:.0f} GiB host RAM available" if facts.mem_available else "host RAM unknown"
    device = ""
    if facts.device_type:
        device = f", {facts.cards} x {facts.device_type} ({facts.card_bytes / GiB:.0f} GiB, driver {facts.driver})"
    elif facts.device_error:
        device = f", hl-smi: {facts.device_error}"
    return f"{facts.node} ({facts.hostname}): {model}, {memory}{device}"


def quant_config_text(plan: MeasurePlan) -> str:
    return json.dumps(plan.quant_config, indent=4) + "\n"


def resolve_conf_path(explicit: Path | None, *, any_state: bool = False) -> Path | None:
    """--conf, else RAY_CALIB_DEVICES_CONF, else ./devices.conf when its cluster is up (or `any_state`)."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("RAY_CALIB_DEVICES_CONF")
    if env:
        return Path(env)
    implicit = Path("devices.conf")
    if not implicit.is_file():
        return None
    if any_state:
        return implicit

    record = state.read(devices.load(implicit).path)
    return implicit if record and record.get("status") == "up" else None


def context_limit(config, info: ModelInfo) -> int:
    """The engine's context: --max-model-len (checked against the model's context), else the default capped by it."""
    if config.max_model_len is not None:
        return config.max_model_len
    return min(DEFAULT_MAX_MODEL_LEN, info.max_positions or DEFAULT_MAX_MODEL_LEN)
