"""INC QUANT_CONFIG files: the six of the seeds' DeepSeek flow, generated, validated, written (docs/design.md §6).

    measure          BF16 KV (KV cache types blocked)   inc_measure_config.json
    measure fp8-kv   FP8 KV (KV cache measured)         inc_measure_with_fp8kv_config.json
    quantize         two nodes, TP16 measurements       inc_quant_config.json / inc_quant_with_fp8kv_config.json
    quantize one-node  unified measurements (TP8)       inc_quant_one_node_config.json / ..._with_fp8kv_one_node_...

Blocklists: `lm_head` always; the MoE router (`ROUTER`) in every config of a MoE model, measure and
quantize alike (a router INC can patch but never measured fails at the first forward); an FP8-KV quantize
config of an MLA model also keeps the attention matmuls and the unused latent-cache variants in BF16, so
only the latent cache itself is FP8 (`MLA_FP8_KV_BLOCK`).
`configs/` in the repository holds these with relative paths; `ray-calib quant-config write` writes them with
absolute `dump_stats_path`s (INC resolves relative paths against each worker's cwd, which differs
between Ray workers and nodes).
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any

from ray_calib import atomic
from ray_calib.errors import ConfigError
from ray_calib.inc.devices import device_for_scales
from ray_calib.inc.methods import METHODS, method_from_inc_dict
from ray_calib.inc.naming import MEASURE_PREFIX, parse_name
from ray_calib.model.config import is_mla, model_config, num_routed_experts

KV_TYPES = ["KVCache", "VLLMKVCache"]
ROUTER = r"mlp\.gate\b"  # the MoE router; the \b keeps gate_up_proj quantized
MLA_FP8_KV_BLOCK = [
    "latent_cache_k_nodeq",
    "latent_cache_v_nodeq",
    "latent_cache_v",
    "matmul_qk",
    "matmul_av",
    "block2batch_matmul",
]

MODES = ("MEASURE", "QUANTIZE", "LOAD", "SHAPE", "NONE")
OBSERVERS = ("maxabs", "maxabs_per_channel", "save", "shape")
_ENUMS = {
    "fp8_config": ("E4M3", "E5M2"),
    "hp_dtype": ("BF16", "FP16", "FP32"),
    "scale_format": ("CONST", "SCALAR"),
    "device_for_scales": ("GAUDI2", "GAUDI3"),
    "measure_exclude": ("NONE", "INPUT", "OUTPUT", "PARAMS", "ALL"),
}
_BOOLS = (
    "quantize_weight",
    "use_qdq",
    "fake_quant",
    "recalc_scales",
    "ignore_modules_wo_measures",
    "seperate_measure_files",
    "measure_on_hpu",
    "dynamic_quantization",
    "row_parallel_linear_allreduce_quantization",
)
KNOWN_KEYS = frozenset(
    {
        "method",
        "mode",
        "observer",
        "allowlist",
        "blocklist",
        "whitelist",
        "blacklist",
        "scale_method",
        "scale_params",
        "dump_stats_path",
        "mod_dict",
        "local_rank",
        "global_rank",
        "world_size",
        "device_type",
        "calibration_sample_interval",
        *_ENUMS,
        *_BOOLS,
    }
)
_SCALE_PARAMS = ("input_backoff", "weight_backoff", "output_backoff")  # output_backoff: INC 3.4


def config_name(*, measure: bool, fp8_kv: bool, one_node: bool = False) -> str:
    kv = "_with_fp8kv" if fp8_kv else ""
    if measure:
        return f"inc_measure{kv}_config.json"
    return f"inc_quant{kv}{'_one_node' if one_node else ''}_config.json"


def build_config(
    *,
    measure: bool,
    fp8_kv: bool,
    one_node: bool,
    dump_stats_path: str,
    moe: bool = True,
    scale_method: str = "maxabs_hw",
    mla: bool = False,
) -> dict[str, Any]:
    """One QUANT_CONFIG as the seeds write it (router blocked for MoE models, KV types for BF16 KV).

    `one_node` only changes where `dump_stats_path` points (the caller's choice); the blocklist is the
    same for the two-node and the one-node quantize config.
    """
    names = ["lm_head"] + ([ROUTER] if moe else [])
    if mla and fp8_kv and not measure:
        names += MLA_FP8_KV_BLOCK
    config: dict[str, Any] = {"method": "HOOKS", "mode": "MEASURE" if measure else "QUANTIZE"}
    if measure:
        config["observer"] = "maxabs"
    else:
        config.update(scale_method=scale_method, scale_format="scalar")
    config["allowlist"] = {"types": [], "names": []}
    config["blocklist"] = {"types": [] if fp8_kv else list(KV_TYPES), "names": names}
    if measure:
        config["quantize_weight"] = False
    config["dump_stats_path"] = dump_stats_path
    return config


def template_set(measure_dir: str, unified_dir: str, *, moe: bool, mla: bool = False) -> dict[str, dict[str, Any]]:
    """All six configs keyed by file name."""
    out = {}
    for fp8_kv in (False, True):
        out[config_name(measure=True, fp8_kv=fp8_kv)] = build_config(
            measure=True,
            fp8_kv=fp8_kv,
            one_node=False,
            dump_stats_path=f"{measure_dir}/{MEASURE_PREFIX}",
            moe=moe,
            mla=mla,
        )
        for one_node in (False, True):
            where = unified_dir if one_node else measure_dir
            out[config_name(measure=False, fp8_kv=fp8_kv, one_node=one_node)] = build_config(
                measure=False,
                fp8_kv=fp8_kv,
                one_node=one_node,
                dump_stats_path=f"{where}/{MEASURE_PREFIX}",
                moe=moe,
                mla=mla,
            )
    return out


def quantizes_kv_cache(config: dict) -> bool:
    """Whether INC quantizes the KV cache under this config (its KV cache types are not blocked).

    The engine's KV cache dtype must follow: `fp8_inc` exactly when INC quantizes the cache, else the
    model dtype (INC in MEASURE never scales what it writes into an FP8 cache).
    """
    blocked = set((config.get("blocklist") or {}).get("types", []))
    return not blocked.intersection(KV_TYPES)


def is_moe(config: dict, model: str = "") -> bool:
    """MoE models get their router (`mlp.gate`) blocked. Decided from config.json's expert count, the same
    rule `measure` uses; only without a local config.json does the hub id decide."""
    if config:
        return bool(num_routed_experts(config))
    return any(key in model.lower() for key in ("deepseek-v", "deepseek-r1", "mixtral", "moe"))


def write_configs(out: Path, configs: dict[str, dict[str, Any]]) -> list[Path]:
    paths = []
    for name, config in configs.items():
        validate(config, name)
        paths.append(atomic.write_text(out / name, json.dumps(config, indent=4) + "\n"))
    return paths


# ---- validation ----------------------------------------------------------------------------------------


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: QUANT_CONFIG not found", fix="run `ray-calib quant-config write` to write one."
        ) from None
    except ValueError as err:
        raise ConfigError(
            f"{path}: not valid JSON ({err})",
            fix="fix the syntax or regenerate it with `ray-calib quant-config write`.",
        ) from None
    return validate(data, str(path))


def validate(config: Any, source: str = "QUANT_CONFIG", *, device: str | None = None) -> dict[str, Any]:
    """The config with legacy keys mapped (whitelist -> allowlist, blacklist -> blocklist); errors name the key."""
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: must be a JSON object", fix="see configs/ for examples.")
    config = dict(config)
    for old, new in (("whitelist", "allowlist"), ("blacklist", "blocklist")):
        if old in config:
            if new in config:
                raise ConfigError(
                    f"{source}: both '{old}' and '{new}' are set", fix=f"keep only '{new}' ('{old}' is its old name)."
                )
            config[new] = config.pop(old)
    unknown = sorted(set(config) - KNOWN_KEYS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(KNOWN_KEYS), n=1)
        raise ConfigError(
            f"{source}: unknown key '{unknown[0]}'",
            fix=f"did you mean '{close[0]}'?" if close else "remove it; INC would reject it.",
        )
    _check_choice(config, "mode", MODES, source)
    _check_choice(config, "observer", OBSERVERS, source, upper=False)
    for key, choices in _ENUMS.items():
        _check_choice(config, key, choices, source)
    for key in _BOOLS:
        if key in config and not isinstance(config[key], bool):
            raise ConfigError(f"{source}: '{key}' is {config[key]!r}", fix="use true or false.")
    for key in ("allowlist", "blocklist"):
        _check_list(config.get(key), key, source)
    method = _check_scale_method(config, source)
    _check_scale_params(config.get("scale_params"), source)
    if config.get("device_for_scales") and device:
        device_for_scales(device, str(config["device_for_scales"]).lower(), method)
    if str(config.get("mode", "QUANTIZE")).upper() in ("MEASURE", "QUANTIZE") and not config.get("dump_stats_path"):
        raise ConfigError(f"{source}: 'dump_stats_path' is missing", fix="set it to <dir>/inc_measure_output.")
    return config


def _check_choice(config: dict, key: str, choices: tuple[str, ...], source: str, *, upper: bool = True) -> None:
    if key not in config:
        return
    value = str(config[key])
    if (value.upper() if upper else value) not in choices:
        raise ConfigError(f"{source}: '{key}' is '{value}'", fix=f"use one of {', '.join(choices)}.")


def _check_list(section: Any, key: str, source: str) -> None:
    if section is None:
        return
    if not isinstance(section, dict) or not set(section) <= {"types", "names"}:
        raise ConfigError(
            f"{source}: '{key}' must be an object with 'types' and 'names' lists",
            fix=f'write "{key}": {{"types": [], "names": []}}.',
        )
    for field in ("types", "names"):
        values = section.get(field, [])
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ConfigError(f"{source}: '{key}.{field}' must be a list of strings", fix='e.g. ["lm_head"].')
    for index, pattern in enumerate(section.get("names", [])):
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(
                f"{source}: '{key}.names[{index}]' = {pattern!r} is not a valid regex ({err})",
                fix="names are Python regexes (re.search); escape dots as \\\\.",
            ) from None


def _check_scale_method(config: dict, source: str) -> str:
    method = config.get("scale_method", "maxabs_hw")
    if isinstance(method, dict):
        if "default" not in method:
            raise ConfigError(f"{source}: 'scale_method' object has no 'default'", fix='add "default": {...}.')
        named = method_from_inc_dict(method)
        if named is None:
            raise ConfigError(
                f"{source}: 'scale_method.default' matches none of INC's scale methods (by granularity, "
                "scale_value_type and rounding_method of weight and activation)",
                fix="copy the fields of a named method (e.g. maxabs_hw: hw_aligned, maxabs) and change "
                "only the backoffs.",
            )
        return named.name
    if str(method).lower() not in METHODS:
        raise ConfigError(f"{source}: 'scale_method' is '{method}'", fix=f"use one of {', '.join(METHODS)}.")
    dynamic = bool(config.get("dynamic_quantization", False))
    if METHODS[str(method).lower()].dynamic_only and not dynamic:
        raise ConfigError(
            f"{source}: 'scale_method' '{method}' needs 'dynamic_quantization': true",
            fix="set it, or use a static method such as maxabs_hw.",
        )
    return str(method).lower()


def _check_scale_params(params: Any, source: str) -> None:
    if params is None:
        return
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: 'scale_params' must be an object", fix='e.g. {"input_backoff": 0.25}.')
    for key, value in params.items():
        if key not in _SCALE_PARAMS:
            raise ConfigError(f"{source}: unknown key 'scale_params.{key}'", fix=f"use {' or '.join(_SCALE_PARAMS)}.")
        if not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ConfigError(f"{source}: 'scale_params.{key}' is {value!r}", fix="use a number in (0, 1].")


# ---- stale scale files -----------------------------------------------------------------------------------


def stale_scale_files(directory: Path) -> list[Path]:
    """INC scale files (any METHOD) older than the newest range file: INC would load them instead."""
    ranges: list[Path] = []
    scales: list[Path] = []
    for path in Path(directory).iterdir() if Path(directory).is_dir() else []:
        parsed = parse_name(path)
        if parsed:
            (scales if parsed[0].method else ranges).append(path)
    if not ranges:
        return []
    newest = max(p.stat().st_mtime for p in ranges)
    return sorted(p for p in scales if p.stat().st_mtime <= newest)


def write_run_configs(
    run, model: str, out: Path, *, fp8_kv: bool, one_node: bool, unified_tp: int = 8
) -> tuple[list[Path], list[Path]]:
    """The measure config and the quantize config (two-node or one-node) of one run, plus stale scale files."""
    config = model_config(model)
    moe, mla = is_moe(config, model), is_mla(config) if config else "deepseek" in model.lower()
    unified = run.unified(unified_tp)
    quant_dir = unified if one_node else run.measure
    configs = {
        config_name(measure=True, fp8_kv=fp8_kv): build_config(
            measure=True,
            fp8_kv=fp8_kv,
            one_node=False,
            moe=moe,
            mla=mla,
            dump_stats_path=str(run.measure / MEASURE_PREFIX),
        ),
        config_name(measure=False, fp8_kv=fp8_kv, one_node=one_node): build_config(
            measure=False,
            fp8_kv=fp8_kv,
            one_node=one_node,
            moe=moe,
            mla=mla,
            dump_stats_path=str(quant_dir / MEASURE_PREFIX),
        ),
    }
    return write_configs(out, configs), stale_scale_files(quant_dir)
