"""Run the quantized model on one node: offline generation, or an OpenAI-compatible `vllm serve`.

On CUDA/CPU the FP8 checkpoint written by `quantize` carries its own quantization config; `--fp8-kv`
adds `kv_cache_dtype="fp8"` (the checkpoint's k/v scales are used), `--no-fp8-kv` passes "bfloat16".
On Gaudi INC quantizes the measured model at load with QUANT_CONFIG in the env (see `infer.gaudi`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ray_calib.engine import sizing
from ray_calib.engine.device import local_device_count
from ray_calib.engine.launch import CPU_KV_ENV, EngineConfig, build_llm, engine_settings, timeout_env, worker_env
from ray_calib.engine.memory import memory_check
from ray_calib.errors import ConfigError, EngineError, ModelError
from ray_calib.inc import RunMeta
from ray_calib.infer import gaudi
from ray_calib.infer.audit import AUDIT_EXTENSION, ScaleAudit, audit, audit_engine, carried_scales, is_quantized
from ray_calib.infer.gaudi import compressed_tensors_fp8_kv
from ray_calib.model.config import model_config, num_routed_experts

logger = logging.getLogger(__name__)

AUTO_MAX_MODEL_LEN = -1  # vLLM: the model's context, lowered to what the KV cache can hold
_CPU_OWN = "; ours on CPU: the KV-cache size per rank and, for TP > 1, VLLM_CPU_OMP_THREADS_BIND=nobind"


def profile_note(config: InferConfig) -> str:
    """What a server gets from vLLM itself (its defaults), and the settings that are ours and why."""
    if config.device != "cpu":
        return (
            "everything else is vLLM's default: CUDA graphs / torch.compile, prefix caching, the checkpoint's "
            "dtype, max_num_seqs"
        )
    compiled = "" if cpu_emulated_fp8_moe(config) else "torch.compile (inductor), "
    note = (
        f"everything else is vLLM's default: {compiled}prefix caching where the attention backend has it, "
        f"the checkpoint's dtype, max_num_seqs{_CPU_OWN}"
    )
    if not compiled:
        note = "eager: torch.compile cannot trace the CPU emulation of an FP8 MoE; " + note
    return note


DEFAULT_PROMPTS = (
    "The capital of France is",
    "Tensor parallelism splits each layer across devices so that",
    "Write a short poem about the sea.",
    "In FP8 inference the activation scale is computed from",
)


@dataclass(frozen=True)
class InferConfig:
    model: Path
    tp_size: int
    device: str  # hpu / cuda / cpu (engine.device.detect_device)
    fp8_kv: bool = False
    quant_config: Path | None = None  # Gaudi only: the QUANTIZE QUANT_CONFIG INC reads at load
    timeout_s: int = 1800  # FP8 graph compiles on Gaudi take long
    max_model_len: int | None = None  # None: vLLM's auto (the model's context, capped by the KV cache)
    kv_cache_gib: float = 1.0  # CPU: KV-cache bytes per rank
    enforce_eager: bool = False  # skip graphs/compilation: faster start, slower steps
    extra_env: dict[str, str] = field(default_factory=dict)
    expert_parallel: bool = False  # Gaudi: the measurements were expert parallel
    max_num_seqs: int | None = None  # None: vLLM's default (Gaudi: set by `infer.gaudi`)
    startup_timeout_s: int | None = None  # how long `serve` waits for /health [None: timeout_s]
    skip_warmup: bool = False  # Gaudi: VLLM_SKIP_WARMUP (faster start, graphs compiled on first use)
    bf16: bool = False  # Gaudi: the model as it is, no INC (eval's BF16 baseline)

    def timeout_env(self) -> dict[str, str]:
        """vLLM aborts a slow start (large weights) or a long first step (FP8 compiles) unless these are raised."""
        return timeout_env(self.timeout_s)


@dataclass
class Completion:
    prompt: str
    text: str
    num_tokens: int


def check_device_type(meta: RunMeta | None, device_type: str, *, allow_mismatch: bool, where: Path) -> None:
    """Scales measured on one device type are wrong on another (Gaudi2 fullscale 240 vs 448 elsewhere)."""
    if meta is None or meta.device_type is None or meta.device_type == device_type:
        return
    if allow_mismatch:
        logger.warning("measurements from %s used on %s (--allow-device-mismatch)", meta.device_type, device_type)
        return
    raise ModelError(
        f"{where}: measured on {meta.device_type} but this node is {device_type}",
        fix="measure on this device type, or pass --allow-device-mismatch if you know the scales carry over.",
    )


def engine_config(config: InferConfig):
    env = {**config.timeout_env(), **config.extra_env}
    if config.device == "hpu":
        if config.quant_config is None and not config.bf16 and compressed_tensors_fp8_kv(config.model) is None:
            raise ModelError("Gaudi inference needs the QUANTIZE QUANT_CONFIG", fix="pass --quant-config FILE.")

        return gaudi.engine_config(config)
    return EngineConfig(
        model=str(config.model),
        tp_size=config.tp_size,
        device=config.device,
        kv_cache_dtype=kv_cache_dtype(config.fp8_kv),
        max_model_len=config.max_model_len or AUTO_MAX_MODEL_LEN,
        kv_cache_gib=config.kv_cache_gib,
        extra_env=env,
        profile="serve",
        max_num_seqs=None,
        enforce_eager=config.enforce_eager or cpu_emulated_fp8_moe(config),
        worker_extension_cls=AUDIT_EXTENSION if checkpoint_kv_scales(config.model) is not None else None,
    )


def cpu_emulated_fp8_moe(config: InferConfig) -> bool:
    """An FP8 MoE checkpoint on CPU: its experts run in the engine plugin's per-expert Python loop, which
    vLLM's fullgraph torch.compile cannot trace, so that engine runs eager (CUDA has native FP8 MoE kernels)."""
    if config.device != "cpu":
        return False

    try:
        model = model_config(config.model)
    except Exception:  # noqa: BLE001 - a bad model directory is reported where it is loaded
        return False
    return bool(num_routed_experts(model)) and "quantization_config" in model


def kv_cache_dtype(fp8_kv: bool) -> str:
    """Always explicit on CPU/CUDA: vLLM resolves "auto" to the checkpoint's KV scheme, so a checkpoint
    with k/v scales would run an FP8 cache even when BF16 was asked for."""
    return "fp8" if fp8_kv else "bfloat16"


def choose_tp(
    model: Path,
    requested: int | None,
    *,
    device: str,
    kv_cache_gib: float,
    max_model_len: int | None,
    preferred: int | None = None,
) -> int:
    """The same TP rules and memory pre-check as `measure`, for the model about to be served or scored."""
    shape = sizing.ModelShape.from_config(model_config(model))
    sizing.check_max_model_len(shape, max_model_len, str(model))
    memory = memory_check(model, sizing.valid_tp_sizes(shape), device, kv_cache_gib)
    return sizing.choose_tp(
        shape,
        requested,
        model_id=str(model),
        memory=memory,
        preferred=preferred,
        devices=sizing.Devices(local_device_count(device), "this node"),
    )


def checkpoint_kv_scales(model: Path) -> bool | None:
    """Whether the checkpoint carries k/v scales (compressed-tensors `kv_cache_scheme`); None: not quantized."""
    try:
        quant = model_config(model).get("quantization_config")
    except Exception:  # noqa: BLE001 - a bad model directory is reported where it is loaded
        return None
    return bool(quant.get("kv_cache_scheme")) if isinstance(quant, dict) else None


def resolve_fp8_kv(model: Path, given: bool | None) -> bool:
    """FP8 KV cache exactly when the checkpoint carries k/v scales; `--fp8-kv` on one without is refused.

    vLLM runs an FP8 cache without scales at scale 1.0 and only logs it: a silently wrong model.
    """
    carried = checkpoint_kv_scales(model)
    if given is None:
        return bool(carried)
    if given and not carried:
        what = "carries no k/v scales (no kv_cache_scheme in config.json)" if carried is False else "is not quantized"
        raise ConfigError(
            f"--fp8-kv: {model} {what}, so vLLM would run the FP8 KV cache at scale 1.0",
            fix="quantize with --fp8-kv after `measure --fp8-kv` (see the run's run.json), or pass --no-fp8-kv.",
        )
    return given


def check_model_dir(model: Path) -> None:
    if not (model / "config.json").is_file():
        raise ModelError(
            f"{model}: no config.json; not a model directory",
            fix="pass the directory `ray-calib quantize` wrote (default <run-dir>/fp8).",
        )


def generate(config: InferConfig, prompts: list[str], *, max_new_tokens: int = 32) -> list[Completion]:
    """Greedy generation over `prompts` with the engine built for this run."""
    return generate_audited(config, prompts, max_new_tokens=max_new_tokens)[0]


def generate_audited(config: InferConfig, prompts: list[str], *, max_new_tokens: int = 32):
    """`generate`, and the scale audit of the loaded FP8 checkpoint (`infer.audit`; None for other models)."""
    check_model_dir(config.model)
    from vllm import SamplingParams

    llm = build_llm(engine_config(config))
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens), use_tqdm=False)
    completions = [
        Completion(prompt=o.prompt, text=o.outputs[0].text, num_tokens=len(o.outputs[0].token_ids)) for o in outputs
    ]
    return completions, audit_engine(llm, config.model) if config.device != "hpu" else None


@dataclass
class Server:
    url: str
    pid: int
    log: Path
    model_name: str


def serve_args(config: InferConfig, *, host: str, port: int) -> list[str]:
    """`vllm serve` arguments: the model, where to listen, and the serve profile's few settings.

    Everything else is vLLM's default, so the server is what a plain `vllm serve` of the checkpoint gives.
    """
    engine = engine_config(config)
    args = ["serve", str(config.model), "--host", host, "--port", str(port), "--served-model-name", config.model.name]
    if engine.resolved_executor == "ray":  # --conf: the ranks are Ray actors spread over the cluster
        args += ["--distributed-executor-backend", "ray"]
    if audits_served(config, host):
        args += ["--worker-extension-cls", AUDIT_EXTENSION]
    for key, value in engine_settings(engine).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        else:
            args += [flag, "auto" if key == "max_model_len" and value == AUTO_MAX_MODEL_LEN else str(value)]
    return args


def serve_command(config: InferConfig, *, host: str, port: int) -> list[str]:
    """The process `serve` starts: vLLM's CLI through `ray_calib.infer.vllm_cli` (it only fixes vllm-cpu's
    version lookup)."""
    return [sys.executable, "-m", "ray_calib.infer.vllm_cli", *serve_args(config, host=host, port=port)]


def serve_env(config: InferConfig, host: str = "127.0.0.1") -> dict[str, str]:
    """The variables `serve` adds to the environment (shown to the user with the arguments)."""
    env = worker_env(engine_config(config))
    if audits_served(config, host):
        env[DEV_MODE_ENV] = "1"
    return env


DEV_MODE_ENV = "VLLM_SERVER_DEV_MODE"  # opens vLLM's /collective_rpc, which the scale audit reads the engine through


def auditable(config: InferConfig) -> bool:
    """An FP8 checkpoint on CPU/CUDA: its engine can be read back (on Gaudi INC keeps its own modules)."""
    return config.device != "hpu" and checkpoint_kv_scales(config.model) is not None


def audits_served(config: InferConfig, host: str) -> bool:
    """Whether `serve` audits the engine's scales: an FP8 checkpoint on CPU/CUDA, served on a loopback host
    only, because the audit needs vLLM's development endpoints (/collective_rpc and friends), which nobody
    outside this machine should reach."""
    if not auditable(config):
        return False
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def audit_served(server: Server, config: InferConfig) -> ScaleAudit | None:
    """The scale audit of a running server: every rank's scales over /collective_rpc, against the checkpoint."""
    if not is_quantized(config.model):
        return None
    body = json.dumps({"method": "ray_calib_scales", "timeout": 120}).encode()
    request = urllib.request.Request(
        f"{server.url}/collective_rpc", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=180) as response:
            ranks = json.loads(response.read())["results"]
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError, KeyError) as err:
        raise EngineError(
            f"vllm serve at {server.url}: the scale audit could not read the engine ({err})", fix=f"see {server.log}"
        ) from None
    return audit(carried_scales(config.model), ranks)


def serve(config: InferConfig, *, host: str = "127.0.0.1", port: int = 8000, log: Path) -> Server:
    """Start `vllm serve` with `serve_args` and wait until /health answers."""
    check_model_dir(config.model)

    env = {**os.environ, **serve_env(config, host)}
    if config.device == "cpu":
        env.pop(CPU_KV_ENV, None)  # it would override --kv-cache-memory-bytes
    args = serve_command(config, host=host, port=port)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as log_file:
        process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://{host}:{port}"
    try:
        _wait_healthy(process, url, log, config.startup_timeout_s or config.timeout_s)
    except BaseException:  # not healthy in time, or Ctrl-C while waiting: stop vLLM's whole session
        stop(process.pid)
        raise
    return Server(url=url, pid=process.pid, log=log, model_name=config.model.name)


def stop(pid: int) -> None:
    """SIGTERM a server's whole session (vLLM's API server and its engine core), if it still runs."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _wait_healthy(process: subprocess.Popen, url: str, log: Path, timeout_s: int) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(empty log)"]
            raise EngineError(
                f"vllm serve exited with code {process.returncode}: {tail[0][:300]}", fix=f"see the full log at {log}."
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise EngineError(
        f"vllm serve did not become healthy within {timeout_s} s", fix=f"see {log}; raise --startup-timeout."
    )


def served_settings(server: Server) -> dict[str, object]:
    """What the running server reports about the model it serves (`/v1/models`), e.g. its resolved context."""
    try:
        with urllib.request.urlopen(f"{server.url}/v1/models", timeout=10) as response:
            models = json.loads(response.read()).get("data", [])
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
        return {}
    entry = next((m for m in models if m.get("id") == server.model_name), models[0] if models else {})
    return {key: entry[key] for key in ("id", "max_model_len", "root") if key in entry}


def complete(server: Server, prompt: str, *, max_tokens: int = 16, timeout_s: float = 120) -> str:
    """One completion through the OpenAI API: the smoke test that the server really serves.
    The first request of an eager CPU server can take minutes (an FP8 MoE at TP=8 on a few cores)."""
    body = json.dumps(
        {"model": server.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    ).encode()
    request = urllib.request.Request(
        f"{server.url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())["choices"][0]["text"]
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError, KeyError, IndexError) as err:
        raise EngineError(
            f"vllm serve at {server.url} is healthy but its smoke-test completion failed ({err})",
            fix=f"see {server.log}",
        ) from None


def load_prompts(path: Path | None) -> list[str]:
    """One prompt per line, or JSONL objects with "prompt" or "text"; the built-in four without a file."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    if not path.is_file():
        raise ModelError(f"{path}: no such prompts file", fix="pass a text file with one prompt per line.")
    prompts = []
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise ModelError(f"{path}: not UTF-8 text (byte {err.start})", fix="save it as UTF-8.") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
                prompts.append(str(record.get("prompt") or record["text"]))
            except (ValueError, KeyError):
                raise ModelError(
                    f"{path}:{number}: JSON line without a 'prompt' or 'text' field",
                    fix="write one prompt per line, or JSONL with a 'prompt' field.",
                ) from None
        else:
            prompts.append(line)
    if not prompts:
        raise ModelError(f"{path}: holds no prompts", fix="write one prompt per line.")
    return prompts
