"""One weight to FP8 bytes, and tensors fed through buffers that are allocated once.

    numpy path   BF16/FP16 weight, one scale per tensor: a 64 KB table lookup (`convert.fp8`), no torch
    torch path   per-channel scales (PCS methods), MSE-searched scales, FP32/FP64 sources

Memory: inputs are either mapped (`Scratch(mapped=True)`: each tensor's pages straight from the page
cache, no copy, unmapped when dropped) or read into input buffers (two when reading ahead: the next
tensor is read while this one is worked on). `Scratch` also holds two FP8 output buffers (one is being
written by the shard writer's thread while the next weight is cast into the other). All are sized by the
largest tensor they take, so the peak does not grow with the checkpoint. Tensors above the input limit
(with `--low-cpu-mem`, the unquantized embeddings and lm_head) are not taken whole: `stream` yields
None for them and the caller copies them in `CHUNK_BYTES` blocks.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ray_calib.convert import fp8
from ray_calib.convert.gptq import gptq_fp8
from ray_calib.model.safetensors_io import DTYPES, ShardReader, TensorInfo

if TYPE_CHECKING:
    import numpy as np  # imported where used: `ray-calib --help` imports this module (pyproject.toml)

_CHUNK_ELEMENTS = 1 << 22  # torch path: cast in row chunks of ~4M elements, float32 scratch stays ~16 MB
CHUNK_BYTES = 16 << 20  # blocks in which tensors too large for the input buffers are copied


class Scratch:
    """Reused buffers; pages are only touched (and counted in RSS) up to the largest tensor seen."""

    def __init__(
        self,
        largest_bytes: int,
        largest_numel: int,
        *,
        read_ahead: bool,
        cast_threads: int = 1,
        mapped: bool = False,
        fullscale: float = fp8.E4M3_MAX,
    ) -> None:
        """`largest_bytes`: the largest tensor taken whole (input buffer size, or with `mapped` the limit);
        `fullscale`: the largest FP8 magnitude the target device represents (casts saturate there)."""
        import numpy as np

        self.mapped = mapped
        self.fullscale = fullscale
        self.input_limit = largest_bytes
        self._read_ahead = read_ahead
        self.inputs = [] if mapped else [np.empty(largest_bytes, dtype=np.uint8) for _ in range(2 if read_ahead else 1)]
        self._fp8 = [np.empty(largest_numel, dtype=np.uint8) for _ in range(2)]
        self._fp8_busy: list = [None, None]  # the write still reading each FP8 buffer (a Future), if any
        self._fp8_next = 0
        self.write_wait = 0.0  # seconds the caster waited for a write to free an FP8 buffer
        self._table: tuple[tuple[str, float], np.ndarray] | None = None
        self.pool = None
        if cast_threads > 1:
            self.pool = ThreadPoolExecutor(cast_threads - 1, thread_name_prefix="cast")

    @property
    def read_ahead(self) -> bool:
        return self._read_ahead

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.input_limit

    def table(self, dtype: str, scale: float) -> np.ndarray:
        """The cast table for (dtype, scale); the members of a fused group share one."""
        if self._table is None or self._table[0] != (dtype, scale):
            self._table = ((dtype, scale), fp8.cast_table(dtype, scale, self.fullscale))
        return self._table[1]

    def fp8_buffer(self, numel: int) -> tuple[int, np.ndarray]:
        """(slot, buffer) for the next FP8 weight, once the write of what it last held is done."""
        slot = self._fp8_next
        self._fp8_next ^= 1
        busy = self._fp8_busy[slot]
        if busy is not None:
            started = time.perf_counter()
            busy.result()
            self.write_wait += time.perf_counter() - started
            self._fp8_busy[slot] = None
        return slot, self._fp8[slot][:numel]

    def busy_until(self, slot: int, write) -> None:
        """`write` (a Future, or None when written already) still reads the FP8 buffer `slot`."""
        self._fp8_busy[slot] = write

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None


def stream(
    reader: ShardReader, names: list[str], scratch: Scratch
) -> Generator[tuple[str, np.ndarray | None], None, None]:
    """(name, raw bytes) in order; buffered bytes are valid until the next item. Mapped, the kernel is
    asked to read the next tensor while the caller works on this one; buffered, with two input buffers
    the next tensor is read on a thread (file reads drop the GIL). A tensor above the input limit comes
    as (name, None): read it with `chunks`."""
    if scratch.mapped:
        for index, name in enumerate(names):
            if scratch.read_ahead and index + 1 < len(names):
                reader.prefetch(names[index + 1])
            yield name, reader.map_raw(name) if scratch.fits(reader.tensors[name].nbytes) else None
        return

    def read(index: int):
        name = names[index]
        if not scratch.fits(reader.tensors[name].nbytes):
            return None
        return reader.read_raw(name, scratch.inputs[index % len(scratch.inputs)])

    if not scratch.read_ahead:
        for index, name in enumerate(names):
            yield name, read(index)
        return
    if not names:
        return

    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
        pending = pool.submit(read, 0)
        for index, name in enumerate(names):
            raw = pending.result()
            if index + 1 < len(names):
                pending = pool.submit(read, index + 1)
            yield name, raw


def chunks(reader: ShardReader, name: str, buffer_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """The bytes of tensor `name` in blocks of `buffer_bytes` through one reused buffer."""
    import numpy as np

    info = reader.tensors[name]
    buffer = np.empty(min(buffer_bytes, info.nbytes), dtype=np.uint8)
    for start in range(0, info.nbytes, buffer.size):
        yield reader.read_range(name, start, buffer[: min(buffer.size, info.nbytes - start)])


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


def fp8_weight(
    raw: np.ndarray, info: TensorInfo, scale: float | None, scratch: Scratch, channel_scales=None, hessian=None
):
    """(slot, FP8 bytes, float32 weight_scale array) for one weight.

    `scale` is the group's per-tensor scale; `channel_scales(torch_weight)` computes per-row scales
    instead (PCS methods). With the layer's input `hessian` the weight is rounded by GPTQ, else to
    nearest. The FP8 bytes live in the scratch's FP8 buffer `slot`: tell the scratch which
    write reads them (`busy_until`) so the buffer is not cast into again before that write is done.
    """
    import numpy as np

    slot, out = scratch.fp8_buffer(info.numel)
    if channel_scales is None and hessian is None and fp8.has_table(info.dtype):
        assert scale is not None, "a per-tensor cast needs the group's scale"
        fp8.cast_with_table(raw.view(np.uint16), scratch.table(info.dtype, scale), out, scratch.pool)
        return slot, out, np.array([scale], dtype=np.float32)
    import torch

    weight = to_torch(raw, info)
    if channel_scales is not None:
        scales = channel_scales(weight).reshape(-1, 1).to(torch.float32)
    else:
        scales = torch.tensor([scale], dtype=torch.float32)
    target = torch.from_numpy(out).view(torch.float8_e4m3fn).reshape(info.shape)
    if hessian is not None:
        gptq_fp8(weight, torch.from_numpy(np.array(hessian)), scales.reshape(-1, 1), out=target)
    else:
        cast_to_fp8(weight, scales, out=target, fullscale=scratch.fullscale)
    return slot, out, scales.numpy()


def cast_to_fp8(weight, scale, out=None, fullscale: float = fp8.E4M3_MAX):
    """float8_e4m3fn(weight / scale), saturating at `fullscale`, in row chunks so float32 scratch stays small."""
    import torch

    if out is None:
        out = torch.empty(weight.shape, dtype=torch.float8_e4m3fn)
    rows = max(1, _CHUNK_ELEMENTS // max(1, weight.shape[-1]))
    per_row = scale.numel() > 1
    for start in range(0, weight.shape[0], rows):
        chunk = weight[start : start + rows].to(torch.float32, copy=True)  # float32 input: not in place
        chunk /= scale[start : start + rows] if per_row else scale
        out[start : start + rows] = chunk.clamp_(-fullscale, fullscale).to(torch.float8_e4m3fn)
    return out
