"""INC's NPZ container: one zip member `arr_0.npy`, a 0-d object array holding the stats dict.

An object array is a pickle, and unpickling runs code. This module therefore never calls
`np.load(allow_pickle=True)`. Reading: the .npy header is parsed here and the pickle is loaded by an
Unpickler whose `find_class` resolves only the numpy globals an array pickle uses (`ALLOWED_GLOBALS`),
each to a small pure-Python decoder; anything else (os.system, builtins.eval, ...) is refused before it
can run. Writing: the same pickle numpy would write (protocol 3, float32 leaves) is emitted opcode by
opcode. Neither direction imports numpy, which keeps `ray-calib unify` fast.
"""

from __future__ import annotations

import ast
import functools
import io
import pickle
import struct
import sys
import zipfile
from array import array
from pathlib import Path
from typing import Any

from ray_calib import atomic
from ray_calib.errors import MeasurementError

_MEMBER = "arr_0.npy"
_MAGIC = b"\x93NUMPY"
_unpack_f4 = struct.Struct("<f").unpack
_pack_f4 = struct.Struct("<f").pack
_TYPECODES = {"f4": "f", "f8": "d", "i4": "i", "i8": "q", "u1": "B", "b1": "B"}


class _DType:
    """Stand-in for numpy.dtype: remembers the type string and byte order."""

    def __init__(self, spec: str, align: bool = False, copy: bool = True) -> None:
        self.spec, self.byteorder = spec, "="

    def __setstate__(self, state: tuple) -> None:
        self.byteorder = state[1]


class Leaf(list):
    """A decoded array: nested lists shaped like the array (so it compares equal to its JSON form).

    The pickle calls `_reconstruct(ndarray, (0,), b'b')`; the allow-list maps `_reconstruct` to this class,
    and `object.__init__` lets it be called with those arguments without a Python-level call.
    """

    __init__ = object.__init__

    def __setstate__(self, state: tuple) -> None:
        _, shape, dtype, _, payload = state
        if shape == (1, 1) and dtype.spec == "f4" and dtype.byteorder == "<":  # INC's per-tensor leaf
            self.append([_unpack_f4(payload)[0]])
            return
        if dtype.spec.startswith("O"):
            self.append(payload[0] if not shape else payload)  # the outer 0-d object array
            return
        if not shape:
            raise _ScalarArray
        values = array(_TYPECODES[dtype.spec], payload)
        if dtype.byteorder == ">" or (dtype.byteorder == "<" and sys.byteorder == "big"):
            values.byteswap()
        self.extend(_nest(values.tolist(), shape))


class _ArrayType:
    """Stand-in for numpy.ndarray: only ever the (ignored) first argument of `_reconstruct`."""


class _ScalarArray(Exception):
    """A 0-d numeric array; only scale files hold these."""


def _nest(flat: list, shape: tuple[int, ...]) -> list:
    for size in reversed(shape[1:]):
        flat = [flat[i:i + size] for i in range(0, len(flat), size)]
    return flat


def _scalar(dtype: _DType, data: bytes | str) -> float:
    raw = data.encode("latin-1") if isinstance(data, str) else data
    return array(_TYPECODES[dtype.spec], raw).tolist()[0]


def _encode(text: str, encoding: str) -> bytes:
    return text.encode(encoding)


# (module, name) -> decoder; numpy 1.x and 2.x spell the core module differently.
ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): _ArrayType,
    ("numpy", "dtype"): _DType,
    ("numpy.core.multiarray", "_reconstruct"): Leaf,
    ("numpy._core.multiarray", "_reconstruct"): Leaf,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("_codecs", "encode"): _encode,  # protocol-2 pickles carry bytes as latin-1 text
}


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, stream: io.BytesIO, path: Path, leaf_class: type[Leaf] = Leaf) -> None:
        super().__init__(stream)
        self._path, self._leaf_class = path, leaf_class

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = ALLOWED_GLOBALS[(module, name)]
            return self._leaf_class if found is Leaf else found
        except KeyError:
            raise MeasurementError(
                self._path, f"holds a pickled '{module}.{name}', which a stats file never needs; refused unloaded",
                fix="regenerate the file with INC or ray-calib; never load stats files of unknown origin.",
            ) from None


def load(path: str | Path) -> Any:
    """Return the object stored in an INC stats NPZ; array leaves come back as nested lists (`Leaf`)."""
    path = Path(path)
    fix = "re-copy it from the node that wrote it or regenerate it."
    try:
        with zipfile.ZipFile(path) as archive:
            raw = archive.read(_MEMBER)
        header_end, descr = _parse_header(raw)
    except (zipfile.BadZipFile, KeyError, ValueError, SyntaxError, OSError) as err:
        raise MeasurementError(path, f"is not a readable INC NPZ ({err})", fix=fix) from None
    if descr != "|O":
        raise MeasurementError(path, f"holds a '{descr}' array, not INC's object array", fix=fix)
    try:
        holder = _AllowListUnpickler(io.BytesIO(raw[header_end:]), path).load()
    except MeasurementError:
        raise
    except _ScalarArray:
        return _load_with_scalars(raw[header_end:], path)
    except Exception as err:  # a corrupt pickle can raise almost anything
        raise MeasurementError(path, f"has a corrupt pickle payload ({type(err).__name__}: {err})", fix=fix) from None
    return holder[0] if isinstance(holder, Leaf) and len(holder) == 1 else holder


def _load_with_scalars(payload: bytes, path: Path) -> Any:
    """Scale files may hold 0-d arrays: decode those to plain floats (slower path, small files)."""

    class ScalarLeaf(Leaf):
        def __setstate__(self, state: tuple) -> None:
            try:
                super().__setstate__(state)
            except _ScalarArray:
                self.append(array(_TYPECODES[state[2].spec], state[4]).tolist()[0])
                self.scalar = True

    def unwrap(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: unwrap(item) for key, item in value.items()}
        if getattr(value, "scalar", False):
            return value[0]
        if isinstance(value, list):
            return [unwrap(item) for item in value]
        return value

    return unwrap(_AllowListUnpickler(io.BytesIO(payload), path, ScalarLeaf).load()[0])


def _parse_header(raw: bytes) -> tuple[int, str]:
    if not raw.startswith(_MAGIC):
        raise ValueError("no .npy magic")
    major = raw[6]
    if major == 1:
        size, start = struct.unpack_from("<H", raw, 8)[0], 10
    else:
        size, start = struct.unpack_from("<I", raw, 8)[0], 12
    header = ast.literal_eval(raw[start:start + size].decode("latin-1"))
    if header.get("descr") == "|O" and header.get("shape") != ():
        raise ValueError(f"unexpected array header {header}")
    return start + size, header["descr"]


# ---- writing ------------------------------------------------------------------------------------------

def dumps(stats: dict[str, Any]) -> bytes:
    """NPZ bytes for `stats` (list leaves), as `np.savez(f, np.array(stats_with_float32_arrays))` writes."""
    body = _pickle_stats(stats)
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (), }"
    header += b" " * (63 - (len(_MAGIC) + 4 + len(header)) % 64) + b"\n"
    npy = _MAGIC + b"\x01\x00" + struct.pack("<H", len(header)) + header + body
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(_MEMBER, npy)
    return buffer.getvalue()


def save(path: str | Path, stats: dict[str, Any]) -> Path:
    return atomic.write_bytes(path, dumps(stats))


# Protocol-3 pickle opcodes of a 0-d object array holding the stats dict, as numpy writes it. Memo slots:
# 0 `_reconstruct`, 1 `ndarray`, 2 the float32 dtype, 3 the object dtype, 4 `dtype`. `numpy.core` is
# spelled so that both numpy 1.x (Gaudi images) and numpy 2.x resolve it.
_PREAMBLE = (
    b"\x80\x03"
    b"cnumpy.core.multiarray\n_reconstruct\nq\x000"
    b"cnumpy\nndarray\nq\x010"
    b"cnumpy\ndtype\nq\x04X\x02\x00\x00\x00f4\x89\x88\x87R"
    b"(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tbq\x020"
    b"h\x04X\x02\x00\x00\x00O8\x89\x88\x87R"
    b"(K\x03X\x01\x00\x00\x00|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tbq\x030"
)
_NEW_ARRAY = b"h\x00h\x01K\x00\x85C\x01b\x87R"  # _reconstruct(ndarray, (0,), b'b')
_LEAF_1X1 = _NEW_ARRAY + b"(K\x01J\x01\x00\x00\x00J\x01\x00\x00\x00\x86h\x02\x89C\x04"  # ... shape (1, 1), 4 bytes
_SHAPE_OPS = {0: b")", 1: b"\x85", 2: b"\x86", 3: b"\x87"}  # EMPTY_TUPLE, TUPLE1..3


def _pickle_stats(stats: dict[str, Any]) -> bytes:
    out = [_PREAMBLE, _NEW_ARRAY, b"(K\x01)h\x03\x89](}("]  # object array state: (1, (), O8, False, [dict
    for key, value in stats.items():
        out.append(_string(key))
        if key == "Nodes":
            _pickle_nodes(value, out)
        else:
            out.append(_plain(value))
    out.append(b"uetb.")  # SETITEMS, APPENDS, TUPLE, BUILD, STOP
    return b"".join(out)


def _pickle_nodes(nodes: dict[str, Any], out: list[bytes]) -> None:
    append = out.append
    append(b"}(")
    for module, node in nodes.items():
        append(_string(module))
        append(b"}(")
        for field, value in node.items():
            append(_string(field))
            if field == "params":
                append(b"}(")
                for key, leaf in value.items():
                    append(_string(key))
                    append(_leaf(leaf))
                append(b"u")
            else:
                append(b"](")
                for leaf in value:
                    append(_leaf(leaf))
                append(b"e")
        append(b"u")
    append(b"u")


@functools.lru_cache(maxsize=1 << 16)
def _string(text: str) -> bytes:
    """BINUNICODE; cached because every rank file repeats the same module names."""
    encoded = text.encode()
    return b"X" + struct.pack("<I", len(encoded)) + encoded


def _leaf(value: Any) -> bytes:
    """A float32 array: INC's per-tensor `[[v]]` on a fast path, any other shape in general."""
    if type(value) is list and len(value) == 1:
        inner = value[0]
        if type(inner) is list and len(inner) == 1 and type(inner[0]) is not list:
            return _LEAF_1X1 + _pack_f4(inner[0]) + b"tb"
    shape, flat = _shape_and_flat(value)
    raw = struct.pack(f"<{len(flat)}f", *flat)
    dims = b"".join(b"J" + struct.pack("<i", d) for d in shape)
    shape_op = _SHAPE_OPS.get(len(shape)) or b"t"
    if len(shape) > 3:
        dims = b"(" + dims
    data = b"C" + bytes([len(raw)]) + raw if len(raw) < 256 else b"B" + struct.pack("<I", len(raw)) + raw
    return b"".join([_NEW_ARRAY, b"(K\x01", dims, shape_op, b"h\x02\x89", data, b"tb"])


def _plain(value: Any) -> bytes:
    if value is None:
        return b"N"
    if isinstance(value, bool):
        return b"\x88" if value else b"\x89"
    if isinstance(value, int) and -2**31 <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    if isinstance(value, float):
        return b"G" + struct.pack(">d", value)
    if isinstance(value, str):
        return _string(value)
    raise TypeError(f"cannot store {type(value).__name__} in a stats NPZ header field")


def _shape_and_flat(value: Any) -> tuple[tuple[int, ...], list[float]]:
    shape: list[int] = []
    probe = value
    while isinstance(probe, list):
        shape.append(len(probe))
        probe = probe[0] if probe else None
    flat = value
    for _ in range(len(shape) - 1):
        flat = [x for row in flat for x in row]
    return tuple(shape), (flat if shape else [value])
