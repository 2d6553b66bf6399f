"""CLI options that `measure`, `infer` and `eval` share about the engine, defined once."""

from __future__ import annotations

import os

import click

from ray_calib.engine.launch import CPU_KV_ENV
from ray_calib.errors import ConfigError


def default_kv_cache_gib() -> float:
    """vLLM's own VLLM_CPU_KVCACHE_SPACE (whole GiB) when the user set it, else 1 GiB per rank."""
    value = os.environ.get(CPU_KV_ENV, "")
    try:
        return float(value) if value else 1.0
    except ValueError:
        raise ConfigError(
            f"{CPU_KV_ENV}={value!r} is not a number", fix="set it to GiB per rank, or unset it."
        ) from None


def _check_kv(ctx: click.Context, param: click.Parameter, value: float | None) -> float:
    value = default_kv_cache_gib() if value is None else value
    if value <= 0:
        raise click.BadParameter(f"must be more than 0 GiB, got {value}", ctx=ctx, param=param)
    return value


kv_cache_gib_option = click.option(
    "--kv-cache-gib",
    type=float,
    default=None,
    callback=_check_kv,
    help="CPU: KV-cache GiB per rank, e.g. 0.25 for many ranks on one host [default: VLLM_CPU_KVCACHE_SPACE, else 1].",
)


max_model_len_option = click.option(
    "--max-model-len",
    type=click.IntRange(min=1),
    default=None,
    help="Context length [default: the model's context, lowered by vLLM to what the KV cache holds].",
)


enforce_eager_option = click.option(
    "--enforce-eager",
    is_flag=True,
    help="Skip CUDA graphs / torch.compile (vLLM's --enforce-eager): faster start, slower steps.",
)
