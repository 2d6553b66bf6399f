"""The pure-Python bf16 emulation (`inc.arith`) against torch's bfloat16 on CPU, where they must agree.

CPU torch computes a bf16 op in float32 and rounds once. That is the HPU's result for a cast, a product
of two bf16 values (exact in float32), log2 and the pow2 / HW rounding INC applies (exercised through
INC's own round_scales_function classes). It is NOT the HPU's result for `bf16_tensor / python_float`:
the HPU multiplies by the bf16 reciprocal, so that one is compared with torch's multiplication, and the
test shows where torch's division differs.
"""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_calib.inc.arith import GaudiMath, bf16, hw_exponent, pow2

torch = pytest.importorskip("torch")

NORMAL = st.floats(min_value=2.0**-120, max_value=2.0**120, allow_nan=False, allow_infinity=False)
FULLSCALE_BACKOFF = st.sampled_from(
    [240.0 * 0.25, 240.0 * 0.5, 448.0 * 0.25, 448.0 * 0.5, 57344.0 * 0.25, 240.0, 448.0, 448.0 * 0.125]
)


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.bfloat16)


def _bf16_values() -> list[float]:
    """Every positive finite normal bfloat16 value (32512 of them)."""
    return [struct.unpack("<f", struct.pack("<I", bits << 16))[0] for bits in range(0x0080, 0x7F80)]


@settings(max_examples=500, deadline=None)
@given(x=st.floats(allow_nan=False, allow_infinity=False, min_value=-3e38, max_value=3e38))
def test_bf16_is_torchs_cast(x):
    assert bf16(x) == torch.tensor(x).to(torch.bfloat16).item()


@settings(max_examples=500, deadline=None)
@given(a=NORMAL, b=NORMAL)
def test_product_is_torchs_bf16_product(a, b):
    a, b = bf16(a), bf16(b)
    if not 2.0**-126 <= a * b < 3e38:
        return
    assert GaudiMath.product(a, b) == (_t(a) * _t(b)).item()


@settings(max_examples=500, deadline=None)
@given(maxabs=st.floats(min_value=2.0**-100, max_value=2.0**100), fsb=FULLSCALE_BACKOFF)
def test_raw_scale_is_the_hpus_multiply_by_the_bf16_reciprocal(maxabs, fsb):
    expected = (_t(maxabs) * torch.tensor(1.0 / fsb).to(torch.bfloat16)).item()
    assert GaudiMath.raw(maxabs, fsb, 1.0) == expected


def test_ceil_log2_is_torchs_for_every_bf16_value():
    """Exhaustive: torch.ceil(torch.log2(bf16)) on CPU, INC's POW2 step, for all 32512 positive normal bf16 values."""
    values = _bf16_values()
    torch_exponents = torch.ceil(torch.log2(torch.tensor(values, dtype=torch.bfloat16))).float().tolist()
    ours = [GaudiMath.ceil_log2(v) for v in values]
    assert ours == torch_exponents
    assert GaudiMath.ceil_log2(0.0) == -math.inf and pow2(GaudiMath.ceil_log2(0.0)) == 0.0


@pytest.mark.parametrize(("device", "factor", "lowest", "highest"), [("GAUDI2", 4, -8, 4), ("GAUDI3", 1, -55, 7)])
def test_pow2_and_hw_rounding_are_incs_own_round_functions(device, factor, lowest, highest):
    """INC's ScaleToPow2 / ScaleToHwAligned run on CPU bf16 tensors: every positive normal bf16 value, and 0."""
    rounding = pytest.importorskip(
        "neural_compressor.torch.algorithms.fp8_quant._core.scale_methods.round_scales_function"
    )
    from neural_compressor.torch.utils.auto_accelerator import INCAcceleratorType

    values = [0.0] + _bf16_values()
    scales = torch.tensor(values, dtype=torch.bfloat16)
    inc_pow2 = rounding.ScaleToPow2().calc(scales).float().tolist()
    inc_hw = rounding.ScaleToHwAligned(getattr(INCAcceleratorType, device)).calc(scales).float().tolist()
    ours_pow2 = [pow2(GaudiMath.ceil_log2(v)) for v in values]
    ours_hw = [2.0 ** hw_exponent(GaudiMath.ceil_log2(v), factor, lowest, highest) for v in values]
    assert ours_pow2 == inc_pow2
    assert ours_hw == inc_hw


def test_torch_cpu_division_is_not_the_hpus():
    """Why raw scales multiply by the bf16 reciprocal: the published Gaudi3 v_cache scale (2^-7) needs it;
    CPU torch's `bf16 / float` gives 2^-6 for the same range."""
    maxabs, fsb = 0.88671875, 448.0 * 0.25
    cpu = torch.exp2(torch.ceil(torch.log2(_t(maxabs) / fsb))).item()
    hpu = pow2(GaudiMath.ceil_log2(GaudiMath.raw(maxabs, 448.0, 0.25)))
    assert (cpu, hpu) == (2.0**-6, 2.0**-7)
