"""`ray-calib infer` on Gaudi: INC quantizes the source model at load with the run's QUANTIZE config.

Defaults come from the run, so `ray-calib infer` needs no path:

    model          the model the run measured (meta sidecar): BF16 weights, or the FP8 checkpoint itself
    TP             the unified TP of the run (else the measured TP)
    QUANT_CONFIG   --quant-config, else devices.conf INC_QUANT_CONFIG_FILENAME, else
                   <run>/configs/inc_quant[_with_fp8kv]_one_node_config.json, written if absent with
                   dump_stats_path at the measurements of that TP
    KV cache       fp8_inc exactly when that config quantizes the KV cache types, else BF16
    EP             on when the measurements were expert parallel (meta ep_size > 1)

The engine runs with HPU graphs (no forced eager), remote code trusted, and the timeouts raised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ray_calib.errors import ConfigError, MeasurementError, ModelError
from ray_calib.inc import RunMeta
from ray_calib.inc.naming import MEASURE_PREFIX
from ray_calib.rundir import RunDir
from ray_calib.runrecord import unified_dirs


@dataclass(frozen=True)
class GaudiServe:
    model: Path
    tp_size: int
    quant_config: Path
    fp8_kv: bool
    expert_parallel: bool
    measurements: Path
    generated: bool  # the QUANT_CONFIG is new (written now, or would be with write=False)
    config: dict


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
    from ray_calib.inc.quant_config import quantizes_kv_cache, read_config

    if model is None:
        if not (meta and meta.model):
            raise ModelError(
                f"{run.root}: no ray_calib_meta.json names the measured model",
                fix="pass --model (the BF16 model or the FP8 checkpoint that was measured).",
            )
        model = Path(meta.model)
    tp_size = tp or (meta.tp_size if meta and meta.tp_size else 8)
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
    from ray_calib.inc import read_meta

    return read_meta(directory) if directory.is_dir() else None


def _one_node_config(
    run: RunDir, model: Path, measurements: Path | None, tp: int, meta: RunMeta | None, fp8_kv: bool | None, write: bool
) -> tuple[Path, dict, bool]:
    """<run>/configs/<one-node quantize config>, pointing at the measurements for `tp` (written if absent)."""
    from ray_calib.inc.quant_config import build_config, config_name, is_moe, read_config, write_configs
    from ray_calib.model.config import is_mla, model_config

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


def serve_fit(config, target_bytes: int | None):
    """HBM per card and host RAM of this node for serving `config` (an InferConfig on Gaudi)."""
    from ray_calib.engine import gaudi
    from ray_calib.engine.device import host_available_bytes
    from ray_calib.model.config import model_config, num_routed_experts

    if target_bytes is None:
        from ray_calib.cluster import hlsmi

        target_bytes = hlsmi.query().memory_bytes
    hf_config = model_config(config.model)
    route = gaudi.route_for(hf_config, str(config.model))
    return route, gaudi.serve_fit(
        config.model,
        route,
        tp_size=config.tp_size,
        moe=bool(num_routed_experts(hf_config)),
        card_bytes=target_bytes,
        host_available=host_available_bytes(),
    )


def check_serve_fit(config, target_bytes: int | None) -> None:
    from ray_calib.engine import gaudi

    route, fit = serve_fit(config, target_bytes)
    gaudi.check_fit(fit, route, [tp for tp in (2, 4, 8, 16) if tp > config.tp_size], None)


def engine_config(config):
    """EngineConfig for an InferConfig on Gaudi: INC QUANTIZE through QUANT_CONFIG, graphs on."""
    from ray_calib.engine import gaudi
    from ray_calib.engine.launch import EngineConfig
    from ray_calib.engine.plan import with_copy_list
    from ray_calib.model.config import model_config

    route = gaudi.route_for(model_config(config.model), str(config.model))
    env = gaudi.engine_env(
        measure=False,
        tp_size=config.tp_size,
        route=route,
        quant_config=str(config.quant_config.absolute()),
        timeout_s=config.timeout_s,
        expert_parallel=config.expert_parallel,
    )
    env.update(config.extra_env)
    return EngineConfig(
        model=str(config.model),
        tp_size=config.tp_size,
        device="hpu",
        quantization=route.quantization,
        ray_address=config.extra_env.get("RAY_ADDRESS"),
        kv_cache_dtype="fp8_inc" if config.fp8_kv else "auto",
        max_model_len=config.max_model_len,
        extra_env=with_copy_list(env),
        profile="serve",
        max_num_seqs=None,
        enforce_eager=config.enforce_eager,
        trust_remote_code=True,
        enable_expert_parallel=config.expert_parallel,
    )
