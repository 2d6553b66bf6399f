"""Weight ranges taken before vLLM's post-load processing rewrites the weights.

vLLM on CPU repacks bf16 linear weights into its GEMM layout and leaves `layer.weight` empty, the CPU
MoE kernel prepacks the expert weights, and the AMX_MLA attention backend derives its own W_UK/W_UV
from MLA's kv_b_proj and then replaces kv_b_proj.weight by an empty tensor. The maxabs of a weight does
not depend on its layout, so we record it (per tensor for linear layers; a reference to the unpacked
expert tensors for MoE, whose per-expert ranges and intermediate activations the observers compute)
just before that happens: vLLM's loader runs every linear layer's quant-method post-processing (where
the capture sits) before any attention layer's, so kv_b_proj is captured intact on every backend.
Installed by the general plugin in each worker, only for measurement runs.
"""

from __future__ import annotations

import functools

WEIGHT_AMAX_ATTR = "_ray_calib_weight_amax"  # 0-d float32 tensor: max |W| of this rank's shard
EXPERT_WEIGHTS_ATTR = "_ray_calib_expert_weights"  # (w13 [E, 2I, H], w2 [E, H, I]) before prepacking

_INSTALLED = False


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    UnquantizedLinearMethod.process_weights_after_loading = _before(
        UnquantizedLinearMethod.process_weights_after_loading, _record_linear)
    UnquantizedFusedMoEMethod.process_weights_after_loading = _before(
        UnquantizedFusedMoEMethod.process_weights_after_loading, _record_experts)
    _INSTALLED = True


def _before(original, record):
    @functools.wraps(original)
    def wrapper(self, layer, *args, **kwargs):
        record(layer)
        return original(self, layer, *args, **kwargs)

    return wrapper


def _record_linear(layer) -> None:
    weight = getattr(layer, "weight", None)
    if weight is None or weight.is_meta or weight.numel() == 0:
        return
    setattr(layer, WEIGHT_AMAX_ATTR, weight.detach().abs().amax().float())


def _record_experts(layer) -> None:
    w13, w2 = getattr(layer, "w13_weight", None), getattr(layer, "w2_weight", None)
    if w13 is None or w2 is None or w13.is_meta or w13.dim() != 3:
        return
    # References, not copies: the backend replaces the parameters, so these stay the unpacked tensors.
    setattr(layer, EXPERT_WEIGHTS_ATTR, (w13.detach(), w2.detach()))
