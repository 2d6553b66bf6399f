"""GPTQ rounding onto the FP8 grid: each weight column's rounding error is fed into the columns not yet
rounded, weighted by the layer's input second moment H = sum(x xᵀ) over the calibration tokens, so the
layer's output error on inputs like those (||(W - Q) X||) shrinks, not just each weight's own error.

The per-tensor scale is chosen first (as without GPTQ) and kept: Q = scale * fp8(W' / scale) with W'
the error-corrected weights, so the checkpoint format does not change. Columns are visited in order of
decreasing H diagonal (the inputs that carry the most energy first), in blocks of 128 with the
Cholesky factor of H⁻¹ (Frantar et al., GPTQ, 2022). H gets 1 % of its mean diagonal as damping (GPTQ's
usual value, and the one a validation split of the calibration source picks among 1, 3, 10 and 30 %:
`benchmarks/bench_quality_choices.py`), and inputs that never fired (zero diagonal) are pinned at 1 so H stays
invertible.
"""

from __future__ import annotations

from typing import Any

from ray_calib.convert import fp8

BLOCK = 128
DAMP = 0.01


def gptq_fp8(weight: Any, hessian: Any, scale: Any, out: Any = None) -> Any:
    """float8_e4m3fn(W' / scale) for the [rows, cols] `weight` and its [cols, cols] input `hessian`.

    `scale`: one float, or a [rows, 1] tensor of per-row scales.
    """
    import torch

    cols = weight.shape[1]
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"hessian of shape {tuple(hessian.shape)} for a weight of {cols} input columns")
    work = weight.to(torch.float32) / scale  # in FP8 units: rounding is fp8(work)
    order = torch.argsort(torch.diagonal(hessian), descending=True)
    work = work[:, order].contiguous()
    inverse_chol = _inverse_cholesky(hessian.to(torch.float64)[order][:, order])
    quantized = torch.empty_like(work)
    for start in range(0, cols, BLOCK):
        end = min(start + BLOCK, cols)
        block, chol = work[:, start:end], inverse_chol[start:end, start:end]
        errors = torch.empty_like(block)
        for i in range(end - start):
            column = block[:, i]
            rounded = column.clamp(-fp8.E4M3_MAX, fp8.E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
            quantized[:, start + i] = rounded
            errors[:, i] = (column - rounded) / chol[i, i]
            block[:, i + 1 :] -= errors[:, i : i + 1] * chol[i, i + 1 :]
        work[:, end:] -= errors @ inverse_chol[start:end, end:]
    restored = torch.empty_like(quantized)
    restored[:, order] = quantized
    if out is None:
        return restored.to(torch.float8_e4m3fn)
    out.copy_(restored)
    return out


def _inverse_cholesky(hessian: Any) -> Any:
    """Upper Cholesky factor of (H + damping)⁻¹, float32."""
    import torch

    hessian = hessian.clone()
    diagonal = torch.diagonal(hessian)
    diagonal[diagonal == 0] = 1.0
    diagonal += DAMP * diagonal.mean()
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    return torch.linalg.cholesky(inverse, upper=True).to(torch.float32)
