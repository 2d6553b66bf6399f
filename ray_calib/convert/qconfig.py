"""The `quantization_config` written into config.json: compressed-tensors, float-quantized.

Why compressed-tensors rather than vLLM's `fp8` method: it is the one format vLLM loads with both
per-tensor and per-channel weight scales (INC's PCS methods), static per-tensor input scales, and
FP8 KV-cache scales (`kv_cache_scheme`), for dense and MoE layers alike; `fp8` has no per-channel
weights. Scales follow the same convention as INC's: `x_fp8 = x / scale`, `x ~ x_fp8 * scale`.
"""

from __future__ import annotations

from typing import Any

from ray_calib.model.names import KEEP_MODULES


def compressed_tensors_config(*, per_channel: bool, dynamic_activations: bool, fp8_kv: bool) -> dict[str, Any]:
    """The config built with compressed-tensors' own classes (it owns the schema and fills every field vLLM
    reads); the hand-written dict is only for installs without it (numpy-only quantize)."""
    try:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError:
        return fallback_config(per_channel=per_channel, dynamic_activations=dynamic_activations, fp8_kv=fp8_kv)

    def args(strategy: str, dynamic: bool = False) -> QuantizationArgs:
        return QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=dynamic)

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=args("channel" if per_channel else "tensor"),
        input_activations=args("token", dynamic=True) if dynamic_activations else args("tensor"),
    )
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        ignore=list(KEEP_MODULES),
        format="float-quantized",
        quantization_status="compressed",
        kv_cache_scheme=args("tensor") if fp8_kv else None,
    )
    return {**config.model_dump(mode="json"), "producer": {"name": "ray-calib"}}


def _quant_args(strategy: str, *, dynamic: bool = False) -> dict[str, Any]:
    return {
        "num_bits": 8,
        "type": "float",
        "strategy": strategy,
        "symmetric": True,
        "dynamic": dynamic,
        "group_size": None,
        "block_structure": None,
        "observer": None,
    }


def fallback_config(*, per_channel: bool, dynamic_activations: bool, fp8_kv: bool) -> dict[str, Any]:
    """The same config as a plain dict, the fields vLLM reads (a test keeps it equal to the library's)."""
    activations = _quant_args("token", dynamic=True) if dynamic_activations else _quant_args("tensor")
    config: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": _quant_args("channel" if per_channel else "tensor"),
                "input_activations": activations,
                "output_activations": None,
            }
        },
        "ignore": list(KEEP_MODULES),
        "kv_cache_scheme": _quant_args("tensor") if fp8_kv else None,
        "producer": {"name": "ray-calib"},
    }
    return config
