"""The numpy FP8 cast equals torch's `(w.float() / scale).clamp(-448, 448).to(float8_e4m3fn)` byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from ray_calib.convert import fp8

torch = pytest.importorskip("torch")

_TORCH = {"BF16": torch.bfloat16, "F16": torch.float16}


def _all_patterns(dtype: str):
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16)
    return torch.from_numpy(bits.copy()).view(_TORCH[dtype])


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
@pytest.mark.parametrize("scale", [1.0, 2.0**-9, 0.0013717, 3.3e-5, 1e-30, 7.77])
def test_table_matches_torch_on_every_pattern(dtype, scale):
    from ray_calib.convert.cast import cast_to_fp8

    patterns = _all_patterns(dtype).reshape(256, 256)
    expected = cast_to_fp8(patterns, torch.tensor([scale], dtype=torch.float32)).view(torch.uint8).numpy().ravel()
    table = fp8.cast_table(dtype, scale)
    mismatched = np.nonzero(table != expected)[0]
    assert mismatched.size == 0, [(hex(i), table[i], expected[i]) for i in mismatched[:5]]


def test_cast_with_table_spans_chunks():
    weight = (torch.randn(3, 700_001) * 0.05).to(torch.bfloat16)  # > one chunk, odd length
    raw = weight.reshape(-1).view(torch.int16).numpy().view(np.uint16)
    out = np.empty(raw.size, dtype=np.uint8)
    fp8.cast_with_table(raw, fp8.cast_table("BF16", 0.05 / 224), out)
    expected = (weight.float() / torch.tensor([0.05 / 224])).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert np.array_equal(out, expected.view(torch.uint8).numpy().ravel())


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_maxabs_equals_torch(dtype):
    torch_dtype = _TORCH.get(dtype, torch.float32)
    weight = (torch.randn(517, 1031) * 0.3).to(torch_dtype)
    weight[200, 5] = -7.5  # the largest magnitude is negative
    raw = weight.reshape(-1).view(torch.uint8).numpy()
    assert fp8.maxabs(raw, dtype) == float(weight.abs().max().float()) == 7.5


def test_maxabs_sees_nan():
    weight = torch.zeros(10, dtype=torch.bfloat16)
    weight[3] = float("nan")
    assert np.isnan(fp8.maxabs(weight.view(torch.uint8).numpy(), "BF16"))
