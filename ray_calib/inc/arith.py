"""The arithmetic INC uses to turn a max-abs value into a scale, bit for bit, in pure Python.

On Gaudi INC computes scales on bfloat16 HPU tensors (`hp_dtype` bf16, INC's default):
    maxabs   torch.tensor(measured, dtype=bf16).max()            -> bf16(m)
    raw      maxabs / (fullscale * backoff)                      -> bf16(bf16(m) * bf16(1 / (fullscale * backoff)))
             (the HPU graph turns a division by a Python float into a multiplication by its bf16 reciprocal)
    pow2     torch.exp2(torch.ceil(torch.log2(raw)))             -> log2 is rounded to bf16 before the ceil
    hw       2 ** (ceil(log2(pow2) / factor) * factor), clamped to the device's HW scale range
    product  input0 * input1 on bf16 tensors                     -> bf16(a * b)
The bf16 rounding of log2 is why ~1-3 % of Gaudi3 scales are one power of two below what float64 math
gives: for raw = 2^n * 1.0078, log2 = n + 0.0112 rounds to n in bf16 (ulp 2^-6 for |n| in [4, 8)), so
the ceil gives 2^n, not 2^(n+1). `GaudiMath` reproduces that; `FloatMath` is plain float64 math for
CPU/CUDA, where ray-calib writes its own FP8 checkpoint and INC is not involved.
"""

from __future__ import annotations

import math
import struct

_F32 = struct.Struct("<f")
_U32 = struct.Struct("<I")
BF16_TINY = 1.1754943508222875e-38  # torch.finfo(torch.bfloat16).tiny (= float32's smallest normal)


def bf16(x: float) -> float:
    """`torch.tensor(x).to(torch.bfloat16)`: round to float32, then to 8 significant bits, ties to even."""
    if x == 0 or not math.isfinite(x):
        return x
    bits = _U32.unpack(_F32.pack(x))[0]
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return _F32.unpack(_U32.pack(bits))[0]


def f32(x: float) -> float:
    """The float32 value nearest to x (what a scale file stores)."""
    return _F32.unpack(_F32.pack(x))[0]


class GaudiMath:
    """INC's scale arithmetic on a Gaudi HPU with hp_dtype bfloat16."""

    name = "bf16"

    @staticmethod
    def raw(maxabs: float, fullscale: float, backoff: float) -> float:
        return bf16(bf16(maxabs) * bf16(1.0 / (fullscale * backoff)))

    @staticmethod
    def ceil_log2(scale: float) -> float:
        """ceil(log2(scale)) with log2 rounded to bf16 first; -inf for 0 (torch.log2(0) = -inf)."""
        return -math.inf if scale == 0 else float(math.ceil(bf16(math.log2(scale))))

    @staticmethod
    def product(a: float, b: float) -> float:
        return bf16(a * b)

    @staticmethod
    def identity(raw: float) -> float:
        return raw


class FloatMath:
    """float64 math (CPU/CUDA): scales for ray-calib's own FP8 checkpoint, not read by INC."""

    name = "float64"

    @staticmethod
    def raw(maxabs: float, fullscale: float, backoff: float) -> float:
        return maxabs / (fullscale * backoff)

    @staticmethod
    def ceil_log2(scale: float) -> float:
        return -math.inf if scale == 0 else float(math.ceil(math.log2(scale)))

    @staticmethod
    def product(a: float, b: float) -> float:
        return a * b

    @staticmethod
    def identity(raw: float) -> float:
        return raw


def pow2(exponent: float) -> float:
    """2^exponent as a bf16/float32 tensor holds it: 0.0 for -inf (torch.exp2(-inf)), inf from 2^128 up."""
    if exponent == -math.inf:
        return 0.0
    return math.inf if exponent >= 128 else 2.0**exponent


def hw_exponent(exponent: float, factor: int, lowest: int, highest: int) -> int:
    """INC's HW_ALIGNED rounding of a pow2 exponent: up to a multiple of `factor`, clamped (-inf -> lowest)."""
    if exponent == -math.inf:
        return lowest
    return min(max(math.ceil(exponent / factor) * factor, lowest), highest)
