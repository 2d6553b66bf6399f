"""The one place that builds the vLLM `LLM` for a run.

profile    measure: eager (HPU: graphs unless --enforce-eager), no prefix caching (observers are forward hooks
                    and must see every token)
           serve:   vLLM's own defaults (CUDA graphs / torch.compile, prefix caching where the attention
                    backend has it, the checkpoint's dtype), as a plain `vllm serve` runs. vLLM CPU runs
                    them too (compiled with inductor: a tiny model starts in ~46 s instead of ~5 s eager
                    on the 2-core box, same step time); all it needs from us is the KV-cache size
                    (kv_cache_memory_bytes, else it claims a share of the whole host per rank) and, for
                    TP > 1, VLLM_CPU_OMP_THREADS_BIND=nobind (`auto` asserts on a single NUMA node).
                    `enforce_eager` is the user's choice (`--enforce-eager`: faster start).
executor   uni (TP=1, no extra process) | mp (one node, one process per rank) | ray (across nodes)
env        set before vLLM starts so every worker inherits it: thread binding on CPU,
           the CPU-on-Ray platform plugin, VLLM_HOST_IP / *_SOCKET_IFNAME of the driver's node
ray        the job's runtime_env carries our variables to Ray workers on every node. `connect_ray` is
           the first Ray call of a run: vLLM copies the driver's runtime_env into its engine config
           (an engine-core process joins as another job), so a bare `ray.init` before it would leave
           every rank without the env. VLLM_RAY_EXTRA_ENV_VARS_TO_COPY names our non-VLLM_ variables
           too, for executors that copy the driver env by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_calib import ui
from ray_calib.engine.device import GiB
from ray_calib.engine.plugins import CPU_RAY_ENV, OBSERVE_ENV, RAY_DEVICE_KEY
from ray_calib.errors import EngineError

EXECUTORS = ("auto", "uni", "mp", "ray")
PROFILES = ("measure", "serve")
CPU_KV_ENV = "VLLM_CPU_KVCACHE_SPACE"  # vLLM's legacy whole-GiB knob; it would override kv_cache_memory_bytes
_IFNAME_VARS = {
    "cpu": ("GLOO_SOCKET_IFNAME",),
    "cuda": ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"),
    "hpu": ("GLOO_SOCKET_IFNAME", "HCCL_SOCKET_IFNAME"),
}


@dataclass(frozen=True)
class EngineConfig:
    model: str
    tp_size: int = 1
    device: str = "cpu"
    executor: str = "auto"
    ray_address: str | None = None  # set: run the ranks as Ray actors of that cluster
    max_model_len: int | None = 1024  # None: vLLM's default (the model's context)
    max_num_seqs: int | None = 16  # None: vLLM's default
    max_num_batched_tokens: int | None = None  # None: vLLM's default (Gaudi serving: max_model_len, as upstream)
    gpu_memory_utilization: float | None = None  # None: vLLM's default (0.9)
    dtype: str = "bfloat16"  # the serve profile leaves it to vLLM ("auto": the checkpoint's dtype)
    seed: int = 0
    kv_cache_dtype: str = "auto"  # "fp8" for FP8 KV (fp8_inc on Gaudi)
    quantization: str | None = None  # None: from the checkpoint's config; "inc" on Gaudi
    kv_cache_gib: float = 1.0  # CPU only: KV-cache bytes per rank (kv_cache_memory_bytes)
    profile: str = "measure"  # see PROFILES in the module docstring
    attention_backend: str | None = None  # force a vLLM attention backend (AttentionBackendEnum name)
    worker_extension_cls: str | None = None
    observe_weights: bool = False  # install the pre-repack weight capture plugin in workers
    host_ip: str | None = None  # VLLM_HOST_IP of the driver's node
    socket_ifname: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    enforce_eager: bool = False  # skip graphs/compilation (the measure profile is always eager but on HPU)
    # Gaudi (INC) engines: remote code as upstream, experts partitioned with EP.
    trust_remote_code: bool = False
    enable_expert_parallel: bool = False

    @property
    def resolved_executor(self) -> str:
        if self.executor != "auto":
            return self.executor
        if self.ray_address:
            return "ray"
        return "uni" if self.tp_size == 1 else "mp"


def worker_env(config: EngineConfig) -> dict[str, str]:
    """Variables every rank needs, whatever process or node it runs in."""
    env: dict[str, str] = {}
    if config.device == "cpu":
        if config.tp_size > 1 or config.resolved_executor == "ray":
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # "auto" asserts on one NUMA node
        if config.resolved_executor == "ray":
            env[CPU_RAY_ENV] = "1"
    if config.observe_weights:
        env[OBSERVE_ENV] = "1"
    if config.socket_ifname:
        env.update({name: config.socket_ifname for name in _IFNAME_VARS[config.device]})
    env.update(config.extra_env)
    return env


def engine_settings(config: EngineConfig) -> dict[str, Any]:
    """The engine arguments this profile sets on top of vLLM's defaults (what `infer --serve` shows)."""
    settings: dict[str, Any] = {"tensor_parallel_size": config.tp_size}
    if config.profile == "measure":
        settings.update(
            dtype=config.dtype,
            # observers are forward hooks: graphs and torch.compile would skip them. On HPU INC measures
            # by patching the modules, which HPU graphs keep (eager only with --enforce-eager).
            enforce_eager=config.enforce_eager if config.device == "hpu" else True,
            enable_prefix_caching=False,  # cached prefixes are not recomputed, so they would not be observed
        )
    else:
        if config.enforce_eager:
            settings["enforce_eager"] = True
        if config.device == "hpu":  # as the upstream Gaudi serving scripts pass it
            settings["dtype"] = config.dtype
    if config.max_model_len is not None:
        settings["max_model_len"] = config.max_model_len
    if config.max_num_seqs is not None:
        settings["max_num_seqs"] = config.max_num_seqs
    if config.max_num_batched_tokens is not None:
        settings["max_num_batched_tokens"] = config.max_num_batched_tokens
    if config.gpu_memory_utilization is not None:
        settings["gpu_memory_utilization"] = config.gpu_memory_utilization
    if config.device == "cpu":
        # vLLM CPU otherwise sizes the KV cache from --gpu-memory-utilization of the whole host per rank,
        # which TP ranks sharing one host cannot all get.
        settings["kv_cache_memory_bytes"] = cpu_kv_bytes(config.kv_cache_gib)
    if config.kv_cache_dtype != "auto":
        settings["kv_cache_dtype"] = config.kv_cache_dtype
    if config.quantization:
        settings["quantization"] = config.quantization
    if config.attention_backend:
        settings["attention_backend"] = config.attention_backend
    if config.trust_remote_code:
        settings["trust_remote_code"] = True
    if config.enable_expert_parallel:
        settings["enable_expert_parallel"] = True
    return settings


def cpu_kv_bytes(gib: float) -> int:
    return int(gib * GiB)


def llm_kwargs(config: EngineConfig) -> dict[str, Any]:
    if config.profile not in PROFILES:
        raise EngineError(f"unknown engine profile {config.profile!r}", fix=f"use one of {', '.join(PROFILES)}.")
    executor = config.resolved_executor
    kwargs: dict[str, Any] = dict(
        model=config.model,
        seed=config.seed,
        distributed_executor_backend=None if executor == "uni" else executor,
        **engine_settings(config),
    )
    if config.worker_extension_cls:
        kwargs["worker_extension_cls"] = config.worker_extension_cls
    return kwargs


def prepare(config: EngineConfig) -> int | None:
    """Set the env and, for the Ray executor, join the cluster; returns the devices it offers (None: not Ray).

    Called before the slow work of a run so a cluster too small for --tp fails at once; `build_llm`
    calls it again (a no-op the second time).
    """
    if config.executor not in EXECUTORS:
        raise EngineError(f"unknown executor {config.executor!r}", fix=f"use one of {', '.join(EXECUTORS)}.")
    if config.resolved_executor == "uni" and config.tp_size > 1:
        raise EngineError(f"executor 'uni' runs one rank but --tp is {config.tp_size}", fix="use --executor mp or ray.")
    env = worker_env(config)
    os.environ.update(env)
    if config.device == "cpu":
        os.environ.pop(CPU_KV_ENV, None)  # --kv-cache-gib is the one source of the CPU KV size
    if config.host_ip:
        os.environ["VLLM_HOST_IP"] = config.host_ip
    if config.resolved_executor != "ray":
        return None
    connect_ray(config)
    return ray_devices(config.device)


def ray_devices(device: str) -> int:
    """Devices of `device`'s kind the joined Ray cluster offers (CPU ranks count the RAY_DEVICE_KEY resource)."""
    import ray

    return int(ray.cluster_resources().get(_ray_key(device), 0))


def _ray_key(device: str) -> str:
    return RAY_DEVICE_KEY if device == "cpu" else {"cuda": "GPU", "hpu": "HPU"}[device]


def build_llm(config: EngineConfig):
    """Set the env, connect to Ray if asked, and start vLLM. Returns the `vllm.LLM`."""
    if prepare(config) is not None:
        _check_ray_devices(config)
    from vllm import LLM

    ui.reroute_library_logs()  # vLLM and Ray install their own handlers on import
    if config.resolved_executor == "ray":
        ui.without_log_file_for_remote_workers()
    try:
        return LLM(**llm_kwargs(config))
    except (ValueError, RuntimeError) as err:
        message = error_reason(err)
        raise EngineError(
            f"vLLM could not start {config.model} at TP {config.tp_size}: {message}",
            fix="check the model directory and --tp; rerun with RAY_CALIB_DEBUG=1 for the traceback.",
        ) from err


def runtime_env(config: EngineConfig) -> dict[str, Any]:
    """The Ray job's runtime_env: our worker env, and the project importable in every Ray worker."""
    project_root = str(Path(__file__).resolve().parents[2])
    python_path = os.pathsep.join(p for p in (project_root, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {**worker_env(config), "PYTHONPATH": python_path}}


def connect_ray(config: EngineConfig) -> None:
    """Join the cluster with the run's runtime_env; the first Ray call of a run must be this one.

    Idempotent: a second call finds Ray joined with the same env. A connection made with another env
    (an earlier run in this process, or a bare `ray.init`) is closed and made again with this one,
    since vLLM copies the driver's runtime_env to every rank and a job's env cannot change.
    """
    import ray

    wanted = runtime_env(config)
    if ray.is_initialized():
        have = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
        if any(have.get(k) != v for k, v in wanted["env_vars"].items() if k != "PYTHONPATH"):
            ray.shutdown()
    if not ray.is_initialized():
        address = config.ray_address or os.environ.get("RAY_ADDRESS")
        try:
            ray.init(address=address, runtime_env=wanted, log_to_driver=False)

            ui.reroute_library_logs()  # ray.init sets up its own logger; its records belong in the log file
        except (ConnectionError, RuntimeError) as err:
            raise EngineError(
                f"cannot join the Ray cluster at {address}: {err}",
                fix="check `ray status` on the head, or run `ray-calib up`.",
            ) from err
    if not config.host_ip and "VLLM_HOST_IP" not in os.environ:
        # vLLM compares the driver's IP with its workers' node IPs: use the one Ray knows for this node.
        os.environ["VLLM_HOST_IP"] = ray.util.get_node_ip_address()


def _check_ray_devices(config: EngineConfig) -> None:
    """Fail fast instead of waiting forever on a placement group the cluster cannot satisfy."""
    key = _ray_key(config.device)
    have = ray_devices(config.device)
    if have < config.tp_size:
        raise EngineError(
            f"the Ray cluster offers {have} '{key}' devices but --tp is {config.tp_size}",
            fix=f"use --tp {max(have, 1)} or start nodes with more devices (ray start --resources='{{\"{key}\": N}}').",
        )


def error_reason(err: BaseException) -> str:
    """The line of a vLLM/pydantic error that says what is wrong (not the trailing doc link)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("For further information")]
    return (lines[-1] if lines else type(err).__name__)[:400]


def timeout_env(seconds: int, ready_s: int | None = None) -> dict[str, str]:
    """vLLM's start-up and per-step limits, raised for large models (weights loading, first graph compiles).

    vLLM 0.32 reads VLLM_ENGINE_READY_TIMEOUT_S (engine start, default 600 s; `ready_s` when given) and
    VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS (one step, default 300 s); older vLLM and the Gaudi forks read
    VLLM_ENGINE_ITERATION_TIMEOUT_S and VLLM_RPC_TIMEOUT (milliseconds). All four are set.
    """
    return {
        "VLLM_ENGINE_READY_TIMEOUT_S": str(ready_s or seconds),
        "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": str(seconds),
        "VLLM_ENGINE_ITERATION_TIMEOUT_S": str(seconds),
        "VLLM_RPC_TIMEOUT": str(seconds * 1000),
    }


def env_to_copy(env: dict[str, str]) -> str:
    """VLLM_RAY_EXTRA_ENV_VARS_TO_COPY for `env`: the names vLLM would not copy to Ray workers by itself."""
    return ",".join(sorted(k for k in env if not k.startswith(("VLLM_", "HF_", "NCCL_"))))
