"""The `quantization_config` written into config.json: compressed-tensors, float-quantized.

Why compressed-tensors rather than vLLM's `fp8` method: it is the one format vLLM loads with both
per-tensor and per-channel weight scales (INC's PCS methods), static per-tensor input scales, and
FP8 KV-cache scales (`kv_cache_scheme`), for dense and MoE layers alike; `fp8` has no per-channel
weights. Scales follow the same convention as INC's: `x_fp8 = x / scale`, `x ~ x_fp8 * scale`.

compressed-tensors owns the schema: the dict below is exactly what its `QuantizationConfig(...)
.model_dump(mode="json")` gives for the same scheme, which tests/convert/test_qconfig.py checks against the
installed library for every combination. It is written without importing the library at run time: that
import pulls torch, transformers and torchao (about 5 s and 500 MB), more than quantizing a 2 GB checkpoint.
"""

from __future__ import annotations

from typing import Any

from ray_calib.model.names import KEEP_MODULES


def _quant_args(strategy: str, *, dynamic: bool = False) -> dict[str, Any]:
    """compressed-tensors `QuantizationArgs(num_bits=8, type="float", strategy=..., symmetric=True, dynamic=...)`."""
    return {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "group_size": None,
        "strategy": strategy,
        "block_structure": None,
        "dynamic": dynamic,
        "actorder": None,
        "scale_dtype": None,
        "zp_dtype": None,
        "observer": None if dynamic else "memoryless_minmax",
        "observer_kwargs": {},
    }


GAUDI2_FP8_FLAVOR = "float8_e4m3fnuz"  # vllm-gaudi's name for Gaudi2's native FP8 (full scale 240)


def compressed_tensors_config(
    *, per_channel: bool, dynamic_activations: bool, fp8_kv: bool, fp8_dtype_flavor: str | None = None
) -> dict[str, Any]:
    activations = _quant_args("token", dynamic=True) if dynamic_activations else _quant_args("tensor")
    config: dict[str, Any] = {
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": _quant_args("channel" if per_channel else "tensor"),
                "input_activations": activations,
                "output_activations": None,
                "format": None,
            }
        },
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": _quant_args("tensor") if fp8_kv else None,
        "format": "float-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": list(KEEP_MODULES),
        "producer": {"name": "ray-calib"},
    }
    if fp8_dtype_flavor is not None:
        config["fp8_dtype_flavor"] = fp8_dtype_flavor
    return config
