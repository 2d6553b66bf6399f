"""The `quantization_config` written into config.json: compressed-tensors, float-quantized.

Why compressed-tensors rather than vLLM's `fp8` method: it is the one format vLLM loads with both
per-tensor and per-channel weight scales (INC's PCS methods), static per-tensor input scales, and
FP8 KV-cache scales (`kv_cache_scheme`), for dense and MoE layers alike; `fp8` has no per-channel
weights. Scales follow the same convention as INC's: `x_fp8 = x / scale`, `x ~ x_fp8 * scale`.
"""

from __future__ import annotations

from typing import Any

from ray_calib.model.names import KEEP_MODULES


def _quant_args(strategy: str, *, dynamic: bool = False) -> dict[str, Any]:
    return {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": dynamic,
            "group_size": None, "block_structure": None, "observer": None}


def compressed_tensors_config(*, per_channel: bool, dynamic_activations: bool, fp8_kv: bool) -> dict[str, Any]:
    activations = _quant_args("token", dynamic=True) if dynamic_activations else _quant_args("tensor")
    config: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": _quant_args("channel" if per_channel else "tensor"),
            "input_activations": activations,
            "output_activations": None,
        }},
        "ignore": list(KEEP_MODULES),
        "kv_cache_scheme": _quant_args("tensor") if fp8_kv else None,
        "producer": {"name": "ray-calib"},
    }
    return config
