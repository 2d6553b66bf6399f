"""One weight to FP8 bytes, and tensors fed through buffers that are allocated once.

    numpy path   BF16/FP16 weight, one scale per tensor: a 64 KB table lookup (`convert.fp8`), no torch
    torch path   per-channel scales (PCS methods), MSE-searched scales, FP32/FP64 sources

Memory: `Scratch` holds one input buffer (two when reading ahead) sized for the largest tensor and
one FP8 output buffer; every tensor is read into them, so the peak does not grow with the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ray_calib.convert import fp8
from ray_calib.convert.safetensors_io import DTYPES, ShardReader, TensorInfo

_CHUNK_ELEMENTS = 1 << 22  # torch path: cast in row chunks of ~4M elements, float32 scratch stays ~16 MB


class Scratch:
    """Reused buffers; pages are only touched (and counted in RSS) up to the largest tensor seen."""

    def __init__(self, largest_bytes: int, largest_numel: int, *, read_ahead: bool) -> None:
        self.inputs = [np.empty(largest_bytes, dtype=np.uint8) for _ in range(2 if read_ahead else 1)]
        self.fp8 = np.empty(largest_numel, dtype=np.uint8)
        self._table: tuple[tuple[str, float], np.ndarray] | None = None

    @property
    def read_ahead(self) -> bool:
        return len(self.inputs) > 1

    def table(self, dtype: str, scale: float) -> np.ndarray:
        """The cast table for (dtype, scale); the members of a fused group share one."""
        if self._table is None or self._table[0] != (dtype, scale):
            self._table = ((dtype, scale), fp8.cast_table(dtype, scale))
        return self._table[1]


def stream(reader: ShardReader, names: list[str], scratch: Scratch) -> Iterator[tuple[str, np.ndarray]]:
    """(name, raw bytes) in order; the bytes are valid until the next item. With two input buffers the
    next tensor is read on a thread while the caller works on this one (file reads drop the GIL)."""
    if not scratch.read_ahead:
        for name in names:
            yield name, reader.read_raw(name, scratch.inputs[0])
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
        pending = pool.submit(reader.read_raw, names[0], scratch.inputs[0]) if names else None
        for index, name in enumerate(names):
            raw = pending.result()
            if index + 1 < len(names):
                pending = pool.submit(reader.read_raw, names[index + 1], scratch.inputs[(index + 1) % 2])
            yield name, raw


def weight_maxabs(raw: np.ndarray, info: TensorInfo) -> float:
    if info.dtype in ("BF16", "F16", "F32", "F64"):
        return fp8.maxabs(raw, info.dtype)
    weight = to_torch(raw, info)
    return float(weight.abs().max().float()) if weight.numel() else 0.0


def to_torch(raw: np.ndarray, info: TensorInfo):
    """A torch view of raw bytes (no copy)."""
    import torch

    dtype = getattr(torch, DTYPES[info.dtype][0])
    return torch.from_numpy(raw).view(dtype).reshape(info.shape)


def fp8_weight(raw: np.ndarray, info: TensorInfo, scale: float | None, scratch: Scratch, channel_scales=None):
    """(FP8 bytes, float32 weight_scale array) for one weight.

    `scale` is the group's per-tensor scale; `channel_scales(torch_weight)` computes per-row scales
    instead (PCS methods). The FP8 bytes live in `scratch.fp8` until the next call.
    """
    out = scratch.fp8[:info.numel]
    if channel_scales is None and fp8.has_table(info.dtype):
        fp8.cast_with_table(raw.view(np.uint16), scratch.table(info.dtype, scale), out)
        return out, np.array([scale], dtype=np.float32)
    import torch

    weight = to_torch(raw, info)
    if channel_scales is not None:
        scales = channel_scales(weight).reshape(-1, 1).to(torch.float32)
    else:
        scales = torch.tensor([scale], dtype=torch.float32)
    cast_to_fp8(weight, scales, out=torch.from_numpy(out).view(torch.float8_e4m3fn).reshape(info.shape))
    return out, scales.numpy()


def cast_to_fp8(weight, scale, out=None):
    """float8_e4m3fn(weight / scale), saturating, in row chunks so float32 scratch stays small."""
    import torch

    if out is None:
        out = torch.empty(weight.shape, dtype=torch.float8_e4m3fn)
    rows = max(1, _CHUNK_ELEMENTS // max(1, weight.shape[-1]))
    per_row = scale.numel() > 1
    for start in range(0, weight.shape[0], rows):
        chunk = weight[start:start + rows].to(torch.float32)
        chunk /= scale[start:start + rows] if per_row else scale
        out[start:start + rows] = chunk.clamp_(-fp8.E4M3_MAX, fp8.E4M3_MAX).to(torch.float8_e4m3fn)
    return out
