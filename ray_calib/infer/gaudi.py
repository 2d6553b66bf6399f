"""`ray-calib infer` on Gaudi: INC quantizes the source model at load with the run's QUANTIZE config.

Defaults come from the run, so `ray-calib infer` needs no path:

    model          the model the run measured (meta sidecar): BF16 weights, or the FP8 checkpoint itself
    TP             the unified TP of the run (else the measured TP)
    QUANT_CONFIG   --quant-config, else devices.conf INC_QUANT_CONFIG_FILENAME, else
                   <run>/configs/inc_quant[_with_fp8kv]_one_node_config.json, written if absent with
                   dump_stats_path at the measurements of that TP
    KV cache       fp8_inc exactly when that config quantizes the KV cache types, else BF16
    EP             on when the measurements were expert parallel (meta ep_size > 1)

    context        --max-model-len, else 16384 as the upstream DeepSeek-R1 quickstart (raised to the calibration
                   length, capped by the model): never the model's full context unless asked; max_num_seqs 64,
                   max_num_batched_tokens = the context, gpu_memory_utilization 0.85 (0.65 above 18432 tokens)
    fit            weights + activations + graph reserve + the KV cache of one full-length sequence per card
    start-up wait  from the checkpoint size and the host read speed plus the warm-up, apart from --timeout

The engine runs with HPU graphs (no forced eager), warms up as upstream does (--skip-warmup to skip),
remote code trusted, and the timeouts raised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ray_calib.cluster import hlsmi
from ray_calib.engine import gaudi
from ray_calib.engine.device import host_available_bytes
from ray_calib.engine.launch import EngineConfig
from ray_calib.engine.plan import with_copy_list
from ray_calib.errors import ConfigError, MeasurementError, ModelError
from ray_calib.inc import RunMeta, read_meta
from ray_calib.inc.naming import MEASURE_PREFIX
from ray_calib.inc.quant_config import build_config, config_name, is_moe, quantizes_kv_cache, read_config, write_configs
from ray_calib.model.config import is_mla, model_config, num_routed_experts
from ray_calib.rundir import RunDir
from ray_calib.runrecord import unified_dirs


@dataclass(frozen=True)
class GaudiServe:
    model: Path
    tp_size: int
    quant_config: Path | None  # None: a compressed-tensors checkpoint (no INC)
    fp8_kv: bool
    expert_parallel: bool
    measurements: Path
    generated: bool  # the QUANT_CONFIG is new (written now, or would be with write=False)
    config: dict
    limits: tuple[str, str] | None = None  # (context and batch, start-up wait), each with why: shown by --dry-run


def measured_tp(tp: int | None, meta: RunMeta | None) -> int:
    """--tp, else the TP the run's measurements are for, else one 8-card node."""
    return tp or (meta.tp_size if meta and meta.tp_size else 8)


def resolve(
    run: RunDir,
    meta: RunMeta | None,
    *,
    model: Path | None,
    tp: int | None,
    quant_config: Path | None,
    fp8_kv: bool | None,
    conf_quant_config: str | None = None,
    write: bool = True,
) -> GaudiServe:
    """Everything Gaudi serving needs, from the flags or from the run; a missing QUANT_CONFIG is written
    (unless `write` is False: a dry run shows it without writing)."""
    if model is None:
        if not (meta and meta.model):
            raise ModelError(
                f"{run.root}: no ray_calib_meta.json names the measured model",
                fix="pass --model (the BF16 model or the FP8 checkpoint that was measured).",
            )
        model = Path(meta.model)
    tp_size = measured_tp(tp, meta)
    measurements = _measurements_at(run, tp_size)
    measured = (measurements and _read_meta(measurements)) or meta
    path = quant_config or (Path(conf_quant_config) if conf_quant_config else None)
    if path is None:
        path, config, generated = _one_node_config(run, model, measurements, tp_size, measured, fp8_kv, write)
    else:
        config, generated = read_config(path), False
        _check_dump_path(
            run, path, config, "--quant-config" if quant_config else "devices.conf INC_QUANT_CONFIG_FILENAME"
        )
        _check_given_dump_path(Path(path), config, tp_size, must_exist=write)
    kv = quantizes_kv_cache(config)
    if fp8_kv is not None and fp8_kv != kv:
        state = "quantizes" if kv else "blocks (keeps BF16)"
        raise ConfigError(
            f"{path}: --{'' if fp8_kv else 'no-'}fp8-kv, but this QUANT_CONFIG {state} the KV cache types",
            fix="drop the flag (the config decides the KV cache dtype) or use the other config.",
        )
    if kv and measured is not None and measured.fp8_kv is False:
        raise ConfigError(
            f"{path} quantizes the KV cache, but the measurements recorded no K/V ranges (measured without --fp8-kv)",
            fix="measure with --fp8-kv, or serve with a BF16-KV config.",
        )
    ep = bool(measured and measured.ep_size and measured.ep_size > 1)
    return GaudiServe(
        model=model,
        tp_size=tp_size,
        quant_config=Path(path).absolute(),
        fp8_kv=kv,
        expert_parallel=ep,
        measurements=measurements or run.measure,
        generated=generated,
        config=config,
    )


def _check_given_dump_path(path: Path, config: dict, tp: int, *, must_exist: bool) -> None:
    """A QUANT_CONFIG given by --quant-config or devices.conf: INC opens `<dump_stats_path>_hooks_maxabs_<r>_<tp>`
    from each rank's working directory, so a relative path, or one without this TP's files, would load other
    (or no) measurements late. The run's own config is checked against the run's measurements instead."""
    dump = str(config.get("dump_stats_path", ""))
    if not Path(dump).is_absolute():
        raise ConfigError(
            f"{path}: dump_stats_path {dump!r} is relative: INC resolves it from every rank's working directory",
            fix="make it absolute (e.g. <run>/unified-tp<TP>/inc_measure_output), or drop the config to have the "
            "run's own written.",
        )
    first = Path(f"{dump}_hooks_maxabs_0_{tp}.json") if tp > 1 else Path(f"{dump}_hooks_maxabs.json")
    if must_exist and not first.is_file() and not Path(f"{dump}_hooks_maxabs_0_{tp}.json").is_file():
        raise ConfigError(
            f"{path}: dump_stats_path {dump} holds no measurements for TP {tp} (no {first.name})",
            fix=f"point it at measurements unified to TP {tp} (`ray-calib unify --to-tp {tp}`), or pass --tp.",
        )


def _check_dump_path(run: RunDir, path: Path, config: dict, source: str) -> None:
    """A given QUANTIZE config must read this run's measurements: INC loads whatever dump_stats_path names
    (the seeds' template names ./scripts/nc_workspace_measure_kvcache/..., old hand-run files or none)."""
    ours = [run.measure, *unified_dirs(run).values()]
    existing = [d.resolve() for d in ours if d.is_dir()]
    if not existing:
        return  # no measurements in this run: the config's own are the only ones
    dump = config.get("dump_stats_path")
    if isinstance(dump, str) and Path(dump).absolute().parent.resolve() in existing:
        return
    raise ConfigError(
        f"{source} {path}: dump_stats_path is {dump!r}, not in this run's measurements "
        f"({', '.join(str(d) for d in existing)})",
        fix=f"set dump_stats_path to {existing[-1] / MEASURE_PREFIX} in it, or drop {source.split()[-1]} so "
        "infer writes the run's own config",
    )


def _measurements_at(run: RunDir, tp: int) -> Path | None:
    for directory in (run.unified(tp), run.measure):
        meta = _read_meta(directory)
        if meta is not None and meta.tp_size == tp:
            return directory
    return None


def _read_meta(directory: Path) -> RunMeta | None:
    return read_meta(directory) if directory.is_dir() else None


def _one_node_config(
    run: RunDir, model: Path, measurements: Path | None, tp: int, meta: RunMeta | None, fp8_kv: bool | None, write: bool
) -> tuple[Path, dict, bool]:
    """<run>/configs/<one-node quantize config>, pointing at the measurements for `tp` (written if absent)."""
    if measurements is None:
        raise MeasurementError(
            run.root,
            f"holds no measurements at TP {tp} (no unified-tp{tp}/ or measure/ at it)",
            fix=f"run `ray-calib unify --to-tp {tp}`, or pass --tp with the TP you have.",
        )
    kv = fp8_kv if fp8_kv is not None else bool(meta and meta.fp8_kv)
    path = run.configs / config_name(measure=False, fp8_kv=kv, one_node=True)
    dump = str(measurements.absolute() / MEASURE_PREFIX)
    if path.exists():
        existing = read_config(path)
        if existing.get("dump_stats_path") != dump:
            raise ConfigError(
                f"{path}: dump_stats_path is {existing.get('dump_stats_path')}, not the TP {tp} measurements {dump}",
                fix="pass --quant-config, or delete it to have it rewritten.",
            )
        return path, existing, False
    config = model_config(model)
    built = build_config(
        measure=False,
        fp8_kv=kv,
        one_node=True,
        dump_stats_path=dump,
        moe=is_moe(config, str(model)),
        mla=is_mla(config),
    )
    if write:
        write_configs(run.configs, {path.name: built})
    return path, built, True


def compressed_tensors_fp8_kv(model: Path) -> bool | None:
    """None: not a compressed-tensors checkpoint; else whether it carries k/v scales (vllm-gaudi: fp8_inc cache)."""
    quant = model_config(model).get("quantization_config") or {}
    if str(quant.get("quant_method", "")).lower() != "compressed-tensors":
        return None
    return quant.get("kv_cache_scheme") is not None


def serve_limits(
    model: Path, meta: RunMeta | None, *, max_model_len: int | None, max_num_seqs: int | None
) -> tuple[int, int, str]:
    """(max_model_len, max_num_seqs, why): bounded as upstream serves DeepSeek-R1, never the model's full
    context unless asked; the calibration length (tokens per measured sample) raises the default."""
    hf = model_config(model)
    text = hf.get("text_config") or hf
    calibration = meta.num_tokens // meta.num_samples if meta and meta.num_tokens and meta.num_samples else None
    context, why = gaudi.serve_context(text.get("max_position_embeddings"), calibration, max_model_len)
    return context, max_num_seqs or gaudi.SERVE_MAX_NUM_SEQS, why


def startup_timeout(config, asked: int | None) -> tuple[int, str]:
    """(seconds, why) `serve` waits for /health: asked, else from the checkpoint size and the host read speed."""
    if asked is not None:
        return asked, "--startup-timeout"
    route = gaudi.route_for(model_config(config.model), str(config.model))
    size = gaudi.checkpoint_bytes(config.model, route)
    rate, how = gaudi.host_read_bytes_s(config.model)
    seconds = gaudi.startup_wait_s(size, rate, warmup=not config.skip_warmup)
    return seconds, (
        f"{gaudi.STARTUP_BASE_S} s start + 2 x {size / 1e9:.0f} GB at {how}"
        + ("" if config.skip_warmup else f" + {gaudi.WARMUP_S} s warm-up")
    )


def serve_fit(config, target_bytes: int | None):
    """HBM per card (weights, KV cache at max_model_len, graph reserve) and host RAM for serving `config`."""
    if target_bytes is None:
        target_bytes = hlsmi.query().memory_bytes
    hf_config = model_config(config.model)
    route = gaudi.route_for(hf_config, str(config.model))
    kv = None
    if config.max_model_len:
        kv = gaudi.kv_need(hf_config, config.tp_size, config.fp8_kv, config.max_model_len, config.max_num_seqs)
    return route, gaudi.serve_fit(
        config.model,
        route,
        tp_size=config.tp_size,
        moe=bool(num_routed_experts(hf_config)),
        card_bytes=target_bytes,
        host_available=host_available_bytes(),
        kv=kv,
    )


def check_serve_fit(config, target_bytes: int | None) -> None:
    route, fit = serve_fit(config, target_bytes)
    gaudi.check_fit(fit, route, [tp for tp in (2, 4, 8, 16) if tp > config.tp_size], None)


def engine_config(config):
    """EngineConfig for an InferConfig on Gaudi: INC QUANTIZE through QUANT_CONFIG, graphs on (`bf16`: the model
    as it is, no INC: eval's baseline)."""
    route = gaudi.route_for(model_config(config.model), str(config.model))
    env = gaudi.engine_env(
        measure=False,
        tp_size=config.tp_size,
        route=route,
        quant_config=str(config.quant_config.absolute()) if config.quant_config and not config.bf16 else None,
        timeout_s=config.timeout_s,
        expert_parallel=config.expert_parallel,
        ready_timeout_s=config.startup_timeout_s,
        skip_warmup=config.skip_warmup,
    )
    env.update(config.extra_env)
    return EngineConfig(
        model=str(config.model),
        tp_size=config.tp_size,
        device="hpu",
        quantization=None if config.bf16 else route.quantization,
        ray_address=config.extra_env.get("RAY_ADDRESS"),
        kv_cache_dtype="fp8_inc" if config.fp8_kv else "auto",
        max_model_len=config.max_model_len,
        extra_env=with_copy_list(env),
        profile="serve",
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_model_len,  # as upstream: one full prompt per step
        gpu_memory_utilization=gaudi.serve_memory_utilization(config.max_model_len) if config.max_model_len else None,
        enforce_eager=config.enforce_eager,
        trust_remote_code=True,
        enable_expert_parallel=config.expert_parallel,
    )
