"""FP8 (float8_e4m3fn) casting of BF16/FP16 weights in numpy, without torch.

Why: `quantize` is I/O-shaped work (read, one max, one cast, write), and importing torch alone
costs ~1.2 s and ~220 MB of RSS on the CI box, more than the cast of a GB. A 16-bit source has only
65536 bit patterns, so `fp8(clamp(float32(x) / float32(scale), -448, 448))` is a 64 KB table built
once per scale and applied with `np.take`, in cache-sized chunks (~2.5 GB/s on one core here). The
table is computed with the same float32 division and round-to-nearest-even as torch's
`.to(torch.float8_e4m3fn)`, so the bytes equal torch's (tests compare all 65536 patterns).

numpy is imported inside the functions: `ray-calib --help` imports this module (through `quantize`) and
must not pay for numpy (pyproject.toml, banned-module-level-imports).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

E4M3_MAX = 448.0
_CHUNK = 1 << 18  # elements per np.take call: index scratch stays in L2
_SIGN16 = 0x7FFF  # the bits of a 16-bit float without its sign
_SOURCES = ("BF16", "F16")


@cache
def _magnitudes() -> np.ndarray:
    """Values of the non-negative finite codes 0..126 (increasing), in float64."""
    import numpy as np

    codes = np.arange(127)
    exponent, mantissa = codes >> 3, codes & 7
    normal = (1.0 + mantissa / 8.0) * np.exp2(exponent - 7.0)
    subnormal = mantissa / 8.0 * 2.0**-6
    return np.where(exponent == 0, subnormal, normal)


def encode_e4m3(values: np.ndarray) -> np.ndarray:
    """float32 -> e4m3fn codes (uint8): nearest value, ties to even, |x| >= 448 saturates, NaN -> 0x7f."""
    import numpy as np

    values = np.asarray(values, dtype=np.float32)
    magnitude = np.minimum(np.abs(values).astype(np.float64), E4M3_MAX)
    magnitudes = _magnitudes()
    below = np.clip(np.searchsorted(magnitudes, magnitude, side="right") - 1, 0, 125)
    low, high = magnitudes[below], magnitudes[below + 1]
    up = (magnitude - low > high - magnitude) | ((magnitude - low == high - magnitude) & (below % 2 == 1))
    codes = (below + up).astype(np.uint8)
    codes[np.isnan(values)] = 0x7F
    return codes | (np.signbit(values).astype(np.uint8) << 7)


def source_values(dtype: str) -> np.ndarray:
    """Every bit pattern of a 16-bit float type, as float32, indexed by the pattern."""
    import numpy as np

    if dtype == "BF16":
        return (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    raise ValueError(f"no cast table for {dtype}")


def cast_table(dtype: str, scale: float, fullscale: float = E4M3_MAX) -> np.ndarray:
    """uint8[65536]: the FP8 code of `pattern / scale` for each 16-bit pattern of `dtype`, saturating at
    `fullscale` (Gaudi2's E4M3 ends at 240: larger codes would not exist there)."""
    import numpy as np

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        scaled = source_values(dtype) / np.float32(scale)
        return encode_e4m3(np.clip(scaled, -fullscale, fullscale))


def has_table(dtype: str) -> bool:
    return dtype in _SOURCES


def cast_with_table(source: np.ndarray, table: np.ndarray, out: np.ndarray, pool=None) -> np.ndarray:
    """out[i] = table[source[i]] for uint16 `source`, in chunks that keep the index scratch in cache.

    `np.take` wants intp indices: each chunk is widened into one reused buffer (a fresh conversion per
    call would allocate, and fault in, 2 MB per chunk), and `mode="clip"` skips the bounds check that
    16-bit indices into a 65536-entry table cannot fail. With a thread `pool` the second half runs
    there; `np.take` releases the GIL, so two halves take two cores.
    """
    flat_in, flat_out = source.reshape(-1), out.reshape(-1)
    if pool is None or flat_in.size < 4 * _CHUNK:
        _take_range(flat_in, table, flat_out, 0, flat_in.size)
        return out
    middle = flat_in.size // 2
    other = pool.submit(_take_range, flat_in, table, flat_out, middle, flat_in.size)
    _take_range(flat_in, table, flat_out, 0, middle)
    other.result()
    return out


def _take_range(source: np.ndarray, table: np.ndarray, out: np.ndarray, begin: int, end: int) -> None:
    import numpy as np

    index = np.empty(min(_CHUNK, max(end - begin, 0)), dtype=np.intp)
    for start in range(begin, end, _CHUNK):
        stop = min(start + _CHUNK, end)
        wide = index[: stop - start]
        np.copyto(wide, source[start:stop], casting="unsafe")
        np.take(table, wide, out=out[start:stop], mode="clip")


def maxabs(raw: np.ndarray, dtype: str) -> float:
    """max |x| of a tensor given as its raw bytes (uint8) in safetensors dtype `dtype`.

    For 16-bit floats the magnitude order equals the integer order of the bits without the sign,
    so this is an integer max (no float temporaries); NaN sorts above inf and comes back as NaN.
    """
    import numpy as np

    if raw.size == 0:
        return 0.0
    if dtype in _SOURCES:
        bits = raw.view(np.uint16)
        scratch = np.empty(min(bits.size, _CHUNK), dtype=np.uint16)
        top = 0
        for start in range(0, bits.size, _CHUNK):
            part = bits[start : start + _CHUNK]
            top = max(top, int(np.bitwise_and(part, _SIGN16, out=scratch[: part.size]).max()))
        if dtype == "BF16":
            return float(np.array([top << 16], dtype=np.uint32).view(np.float32)[0])
        return float(np.array([top], dtype=np.uint16).view(np.float16)[0])
    if dtype in ("F32", "F64"):
        values = raw.view(np.float32 if dtype == "F32" else np.float64)
        return max(float(np.abs(values[s : s + _CHUNK]).max()) for s in range(0, values.size, _CHUNK))
    raise ValueError(f"no maxabs for {dtype}")


# ---- block FP8 -> BF16 (DeepSeek checkpoints) -------------------------------------------------------------


def e4m3_decode_table() -> np.ndarray:
    """float32[256]: the value of every e4m3fn code (0x7f/0xff are NaN)."""
    import numpy as np

    values = np.concatenate([_magnitudes(), [np.nan]]).astype(np.float32)
    return np.concatenate([values, -values])


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even, NaN -> 0x7fc0 like torch); returns uint16 bits."""
    import numpy as np

    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def as_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A small tensor (e.g. scale_inv) as float32, from its raw bytes."""
    import numpy as np

    if dtype == "F32":
        return raw.view(np.float32)
    if dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    raise ValueError(f"no float32 view for {dtype}")


def dequantize_blocks(codes: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], out: np.ndarray) -> np.ndarray:
    """BF16 bits of `e4m3(codes) * scale_inv[i // bm, j // bn]` (float32 product, rounded once), edge blocks cropped.

    Each block's 256 possible products are one row of a small table, so the work per element is one
    uint8 + int32 add and one table lookup, one block row at a time (int32 scratch of bm x N).
    """
    import numpy as np

    rows, cols = codes.shape
    block_m, block_n = block
    tables = float32_to_bf16_bits(scale_inv.reshape(-1, 1).astype(np.float32) * e4m3_decode_table()).reshape(-1)
    column_blocks = -(-cols // block_n)
    column_base = (np.arange(cols, dtype=np.int32) // block_n) * 256
    scratch = np.empty((min(block_m, rows), cols), dtype=np.int32)
    for start in range(0, rows, block_m):
        stop = min(start + block_m, rows)
        index = scratch[: stop - start]
        np.add(codes[start:stop], column_base + (start // block_m) * column_blocks * 256, out=index)
        np.take(tables, index, out=out[start:stop])
    return out
