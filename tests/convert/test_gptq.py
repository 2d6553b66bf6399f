"""GPTQ rounding onto the FP8 grid: it lowers the layer's output error on correlated inputs, and is
round-to-nearest when the inputs are uncorrelated (nothing to feed the error into)."""

from __future__ import annotations

import pytest
import torch

from ray_calib.convert.cast import cast_to_fp8
from ray_calib.convert.gptq import gptq_fp8


def correlated_inputs(tokens: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Rows with a few strong directions shared by every draw, as LLM hidden states have."""
    basis = torch.randn(8, cols, generator=torch.Generator().manual_seed(cols))
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, 8, generator=generator) @ basis + 0.1 * torch.randn(tokens, cols, generator=generator)


def output_error(weight: torch.Tensor, quantized: torch.Tensor, scale: float, inputs: torch.Tensor) -> float:
    return float(((weight - quantized.to(torch.float32) * scale) @ inputs.T).pow(2).sum())


def test_gptq_lowers_the_output_error_on_held_out_inputs_like_the_calibration_ones():
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    scale = float(weight.abs().max()) / 448
    calibration, held_out = correlated_inputs(512, 96, seed=2), correlated_inputs(512, 96, seed=3)
    gptq = gptq_fp8(weight, calibration.T @ calibration, scale)
    nearest = cast_to_fp8(weight, torch.tensor(scale))
    assert gptq.dtype == torch.float8_e4m3fn
    assert output_error(weight, gptq, scale, held_out) < 0.5 * output_error(weight, nearest, scale, held_out)


def test_uncorrelated_inputs_leave_round_to_nearest():
    weight = torch.randn(32, 48, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    scale = torch.full((32, 1), 0.002)  # per-row scales take the same path
    gptq = gptq_fp8(weight, 7.0 * torch.eye(48), scale)
    assert torch.equal(gptq.view(torch.uint8), cast_to_fp8(weight, scale).view(torch.uint8))


def test_inputs_that_never_fired_do_not_break_the_factorization():
    weight = torch.randn(16, 32)
    inputs = correlated_inputs(64, 32)
    inputs[:, 5] = 0.0
    out = torch.empty(16, 32, dtype=torch.float8_e4m3fn)
    gptq_fp8(weight, inputs.T @ inputs, 0.01, out=out)
    assert torch.isfinite(out.to(torch.float32)).all()


def test_a_hessian_of_another_width_is_refused():
    with pytest.raises(ValueError, match="32 input columns"):
        gptq_fp8(torch.zeros(4, 32), torch.eye(16), 1.0)
