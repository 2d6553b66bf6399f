"""MaxAbs keeps max |x| exactly from a running max and min (no |x| copy), in the activations' dtype."""

from __future__ import annotations

import torch

from ray_calib.measure.stats import MaxAbs, amax, row_amax


def test_max_abs_from_running_extremes_of_both_signs():
    slot = MaxAbs()
    assert slot.get() == 0.0
    generator = torch.Generator().manual_seed(0)
    parts = [
        torch.randn(5, 7, generator=generator).to(torch.bfloat16) - 3,  # all negative
        torch.randn(5, 7, generator=generator).to(torch.bfloat16) + 3,  # all positive
        torch.randn(2, 7, generator=generator).to(torch.bfloat16),
    ]
    for t in parts:
        slot.update(t)
    assert slot.get() == max(float(t.abs().max()) for t in parts)
    assert slot.hi.dtype == torch.bfloat16, "a maximum of bf16 values stays a bf16 value"
    negative = MaxAbs()
    negative.update(parts[0])
    assert negative.get() == float(parts[0].abs().max())


def test_reduced_maxima_and_mixed_dtypes():
    slot = MaxAbs()
    slot.update(torch.tensor([-0.5, 0.25], dtype=torch.bfloat16))
    slot.update_amax(torch.tensor(0.375, dtype=torch.bfloat16))
    assert slot.get() == 0.5
    slot.update(torch.tensor([1.0 + 2.0**-20], dtype=torch.float32))  # not a bf16 value: kept in float32
    assert slot.get() == 1.0 + 2.0**-20
    slot.update(torch.empty(0))
    slot.reset()
    assert slot.get() == 0.0


def test_amax_and_row_amax():
    t = torch.tensor([[-3.0, 2.0], [1.0, -0.5]], dtype=torch.bfloat16)
    assert float(amax(t)) == 3.0 and amax(t).dtype == torch.bfloat16
    assert row_amax(t).tolist() == [3.0, 1.0]
