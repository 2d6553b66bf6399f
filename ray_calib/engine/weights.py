"""Weight ranges taken before vLLM's post-load processing rewrites the weights.

vLLM on CPU repacks bf16 linear weights into its GEMM layout and leaves `layer.weight` empty, the CPU
MoE kernel prepacks the expert weights, and the AMX_MLA attention backend derives its own W_UK/W_UV
from MLA's kv_b_proj and then replaces kv_b_proj.weight by an empty tensor. The maxabs of a weight does
not depend on its layout, so we record it (per tensor for linear layers, per expert for MoE) just
before that happens: vLLM's loader runs every linear layer's quant-method post-processing (where the
capture sits) before any attention layer's, so kv_b_proj is captured intact on every backend.

MoE layers also keep a reference to the unpacked W13 (gate|up) tensor, which the observers need to
recompute each expert's intermediate activation; W2 is not kept. On a backend that repacks the experts
(vLLM CPU) that W13 is then held twice, and `engine.memory` counts it in a measurement's memory check.
Installed by the general plugin in each worker, only for measurement runs.
"""

from __future__ import annotations

import functools

WEIGHT_AMAX_ATTR = "_ray_calib_weight_amax"  # 0-d float32 tensor: max |W| of this rank's shard
EXPERT_W13_ATTR = "_ray_calib_expert_w13"  # w13 [E, 2I, H] before prepacking (a reference, not a copy)
EXPERT_AMAX_ATTR = "_ray_calib_expert_amax"  # (max |W13[e]|, max |W2[e]|): two float32 [E] tensors

_INSTALLED = False


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    UnquantizedLinearMethod.process_weights_after_loading = _before(
        UnquantizedLinearMethod.process_weights_after_loading, _record_linear
    )
    UnquantizedFusedMoEMethod.process_weights_after_loading = _before(
        UnquantizedFusedMoEMethod.process_weights_after_loading, _record_experts
    )
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
    # A reference: the backend replaces the parameter, so this stays the unpacked tensor (held twice then).
    setattr(layer, EXPERT_W13_ATTR, w13.detach())
    setattr(layer, EXPERT_AMAX_ATTR, tuple(w.detach().abs().amax(dim=(1, 2)).float() for w in (w13, w2)))
