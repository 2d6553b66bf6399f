"""INC's NPZ container: one zip member `arr_0.npy`, a 0-d object array holding the stats dict.

An object array is a pickle, and unpickling runs code. This module therefore never calls
`np.load(allow_pickle=True)`. Reading: the .npy header is parsed here and the pickle is loaded by an
Unpickler whose `find_class` resolves only the numpy globals an array pickle uses (`ALLOWED_GLOBALS`),
each to a small pure-Python decoder; anything else (os.system, builtins.eval, ...) is refused before it
can run. Writing: the same pickle numpy 1.x would write (protocol 3, float32 leaves) is emitted opcode
by opcode. Neither direction imports numpy, which keeps `ray-calib unify` fast.

Leaves: a nested list is a float32 array of that shape (range files: `[[v]]`); a bare float is a 0-d
float32 array (scale files). Containers are kept as they are: INC's scale files hold `outputs` as a
tuple and per-channel weight scales as a dict with int keys `{0: ..., 1: ...}`; both round-trip.
"""

from __future__ import annotations

import ast
import io
import pickle
import struct
import sys
import zipfile
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray_calib import atomic
from ray_calib.errors import MeasurementError

_MEMBER = "arr_0.npy"
_MAGIC = b"\x93NUMPY"
_unpack_f4 = struct.Struct("<f").unpack
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
        flat = [flat[i : i + size] for i in range(0, len(flat), size)]
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
                self._path,
                f"holds a pickled '{module}.{name}', which a stats file never needs; refused unloaded",
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
        if isinstance(value, tuple):
            return tuple(unwrap(item) for item in value)
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
    header = ast.literal_eval(raw[start : start + size].decode("latin-1"))
    if header.get("descr") == "|O" and header.get("shape") != ():
        raise ValueError(f"unexpected array header {header}")
    return start + size, header["descr"]


# ---- writing ------------------------------------------------------------------------------------------
#
# numpy stores an object array as `pickle.dump(array, protocol=3)`. `image()` emits exactly the bytes
# CPython's pickler writes for INC's stats (memo puts and gets included), opcode by opcode and without
# numpy. One function therefore serves both directions: `save` writes numpy's bytes, and `holds` checks
# an NPZ against its JSON by comparing bytes instead of unpickling (the decode is most of unify's time).

_FIELD_NAMES = frozenset({"inputs", "outputs", "params", "weight"})  # code literals in INC: one object each
_BATCH = 1000  # the pickler's SETITEMS / APPENDS batch size
_CORE_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1.x (Gaudi images) / 2.x


def _preamble(core: str) -> bytes:
    """Memo 0-12: `_reconstruct`, `ndarray`, (0,), b'b', the args, the 0-d object array, its O8 dtype."""
    return (
        b"\x80\x03c" + core.encode() + b"\n_reconstruct\nq\x00cnumpy\nndarray\nq\x01K\x00\x85q\x02C\x01bq\x03"
        b"\x87q\x04Rq\x05(K\x01)cnumpy\ndtype\nq\x06X\x02\x00\x00\x00O8q\x07\x89\x88\x87q\x08Rq\t"
        b"(K\x03X\x01\x00\x00\x00|q\nNNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tq\x0bb\x89]q\x0c"
    )


_NodePacker = Callable[[int, float, float], bytes]  # (memo index, input max, weight max) -> pickle bytes


class _Image:
    """The pickler's output stream and memo counter for one stats dict."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.memo_size = 13  # after the preamble
        self.field_names: dict[str, int] = {}
        self.float32 = -1  # memo index of the float32 dtype once written
        self.weight_node: _NodePacker | None = None  # packs the commonest node once its names and dtype are memoized

    def put(self) -> int:
        index = self.memo_size
        self.memo_size += 1
        self.out.append(_put(index))
        return index

    def string(self, text: str) -> None:
        if text in _FIELD_NAMES:
            if text in self.field_names:
                return self.out.append(_get(self.field_names[text]))
            self.field_names[text] = self.memo_size
        raw = text.encode("utf-8", "surrogatepass")
        self.out.append(b"X" + _U32(len(raw)) + raw)
        self.put()

    def plain(self, value: Any) -> None:
        if value is None or type(value) is bool:
            self.out.append({None: b"N", True: b"\x88", False: b"\x89"}[value])
        elif type(value) is int:
            self.out.append(_int(value))
        elif type(value) is float:
            self.out.append(b"G" + struct.pack(">d", value))
        elif type(value) is str:
            self.string(value)
        else:
            raise TypeError(f"cannot store {type(value).__name__} in a stats NPZ header field")

    def container(self, items: list, write_item, *, is_dict: bool) -> None:
        """EMPTY_DICT/LIST, then SETITEM/APPEND for one item, else MARK ... SETITEMS/APPENDS batches."""
        self.out.append(b"}" if is_dict else b"]")
        self.put()
        if len(items) == 1:
            write_item(items[0])
            self.out.append(b"s" if is_dict else b"a")
            return
        for start in range(0, len(items), _BATCH):
            self.out.append(b"(")
            for item in items[start : start + _BATCH] if len(items) > _BATCH else items:
                write_item(item)
            self.out.append(b"u" if is_dict else b"e")
        if is_dict and items and len(items) % _BATCH == 0:
            self.out.append(b"(u")  # the pickler's do-while writes one empty batch after a full one

    def stats(self, stats: dict[str, Any]) -> None:
        self.container(list(stats.items()), self._header_item, is_dict=True)

    def _header_item(self, item: tuple[str, Any]) -> None:
        key, value = item
        self.string(key)
        if key == "Nodes":
            self.container(list(value.items()), self._node, is_dict=True)
        else:
            self.plain(value)

    def _node(self, item: tuple[str, dict[str, Any]]) -> None:
        """Module name and its dict of 1-3 fields (no batching): ~all of a file, hence written inline."""
        module, node = item
        raw = module.encode("utf-8", "surrogatepass")
        index = self.memo_size
        self.memo_size = index + 2
        out = self.out
        out.append(b"X" + _U32(len(raw)) + raw + _put(index) + b"}" + _put(index + 1))
        if self.weight_node is None and index >= 256 and self.float32 >= 0 and len(self.field_names) == 4:
            self.weight_node = self._weight_node_packer()
        if self.weight_node and len(node) == 2 and "params" in node:
            try:  # {"inputs": [[[x]]], "params": {"weight": [[w]]}}, ~85% of nodes
                (((x,),),) = node["inputs"]
                ((w,),) = node["params"]["weight"]
                if len(node["params"]) == 1 and type(x) is float and type(w) is float:
                    self.memo_size += 14
                    return out.append(self.weight_node(index + 2, x, w))
            except (ValueError, TypeError, KeyError):
                pass
        if len(node) > 1:
            out.append(b"(")
        for name, value in node.items():
            self.string(name)
            if name == "params":
                self.container(list(value.items()), self._param, is_dict=True)
            elif type(value) is tuple:
                self.tuple(value, self.leaf)
            else:
                self.container(value, self.leaf, is_dict=False)
        out.append(b"u" if len(node) > 1 else b"s")

    def _param(self, item: tuple[Any, Any]) -> None:
        """A param leaf, or INC's per-channel weight scales `{0: out_channels, 1: in_channels}`."""
        key, value = item
        self.string(key) if type(key) is str else self.plain(key)
        if type(value) is dict:
            self.container(list(value.items()), self._param, is_dict=True)
        else:
            self.leaf(value)

    def tuple(self, items: tuple, write_item) -> None:
        """EMPTY_TUPLE; TUPLE1-3 after the items; else MARK ... TUPLE. Non-empty tuples are memoized."""
        if not items:
            self.out.append(b")")
            return
        if len(items) > 3:
            self.out.append(b"(")
        for item in items:
            write_item(item)
        self.out.append(_TUPLE_OPS.get(len(items), b"t"))
        self.put()

    def _weight_node_packer(self) -> _NodePacker:
        """One struct for `{"inputs": [[[x]]], "params": {"weight": [[w]]}}`: memo puts i..i+13, LONG_BINPUT."""
        inputs, params, weight = (_get(self.field_names[n]) for n in ("inputs", "params", "weight"))
        head, middle = b"(" + inputs + b"]r", b"a" + params + b"}r"
        pack = struct.Struct(f"<{len(head)}sI{self.leaf_format}{len(middle)}sI{len(weight)}s{self.leaf_format}2s").pack
        r0, r1, r2, r3, dtype = *_LEAF_OPS, self.get_float32

        def pack_node(i: int, x: float, w: float) -> bytes:
            return pack(
                head,
                i,
                r0,
                i + 1,
                r1,
                i + 2,
                r2,
                i + 3,
                r3,
                i + 4,
                dtype,
                x,
                b"r",
                i + 5,
                b"tr",
                i + 6,
                b"b",
                middle,
                i + 7,
                weight,
                r0,
                i + 8,
                r1,
                i + 9,
                r2,
                i + 10,
                r3,
                i + 11,
                dtype,
                w,
                b"r",
                i + 12,
                b"tr",
                i + 13,
                b"b",
                b"su",
            )

        return pack_node

    def leaf(self, value: Any) -> None:
        """A float32 array: `_reconstruct(ndarray, (0,), b'b')`, then BUILD with (1, shape, dtype, False, bytes)."""
        out = self.out
        index = self.memo_size
        if index >= 256 and self.float32 >= 0 and type(value) is list and len(value) == 1:
            inner = value[0]
            if type(inner) is list and len(inner) == 1 and type(inner[0]) is float:  # INC's [[v]], ~all leaves
                self.memo_size = index + 6
                r0, r1, r2, r3 = _LEAF_OPS
                out.append(
                    self.leaf_1x1(
                        r0,
                        index,
                        r1,
                        index + 1,
                        r2,
                        index + 2,
                        r3,
                        index + 3,
                        self.get_float32,
                        inner[0],
                        b"r",
                        index + 4,
                        b"tr",
                        index + 5,
                        b"b",
                    )
                )
                return
        out.append(b"h\x00h\x01K\x00\x85")
        self.put()
        out.append(b"h\x03\x87")
        self.put()
        out.append(b"R")
        self.put()
        out.append(b"(K\x01")
        shape, flat = _shape_and_flat(value)
        if shape:
            out.append(b"".join(map(_int, shape)) + (_TUPLE_OPS[len(shape)] if len(shape) <= 3 else b"t"))
            if len(shape) > 3:
                out[-1] = b"(" + out[-1]
            self.put()
        else:
            out.append(b")")
        self._float32()
        raw = struct.pack(f"<{len(flat)}f", *flat)
        out.append(b"\x89C" + bytes((len(raw),)) + raw if len(raw) < 256 else b"\x89B" + _U32(len(raw)) + raw)
        self.put()
        out.append(b"t")
        self.put()
        out.append(b"b")

    def _float32(self) -> None:
        if self.float32 >= 0:
            return self.out.append(_get(self.float32))
        self.out.append(b"h\x06X\x02\x00\x00\x00f4")
        self.put()
        self.out.append(b"\x89\x88\x87")
        self.put()
        self.out.append(b"R")
        self.float32 = self.put()
        # From here on a [[v]] leaf is one struct: six LONG_BINPUTs around the dtype GET and the value.
        self.get_float32 = _get(self.float32) + b"\x89C\x04"
        self.leaf_format = f"8sI4sI2sI9sI{len(self.get_float32)}sf1sI2sI1s"
        self.leaf_1x1 = struct.Struct("<" + self.leaf_format).pack
        self.out.append(b"(K\x03X\x01\x00\x00\x00<")
        self.put()
        self.out.append(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t")
        self.put()
        self.out.append(b"b")


_TUPLE_OPS = {1: b"\x85", 2: b"\x86", 3: b"\x87"}
# A [[v]] leaf up to its dtype: _reconstruct(ndarray, (0,), b'b') with LONG_BINPUTs, BUILD state (1, (1, 1), ...
_LEAF_OPS = (b"h\x00h\x01K\x00\x85r", b"h\x03\x87r", b"Rr", b"(K\x01K\x01K\x01\x86r")
_U32 = struct.Struct("<I").pack


def _put(index: int) -> bytes:
    return b"q" + bytes((index,)) if index < 256 else b"r" + _U32(index)


def _get(index: int) -> bytes:
    return b"h" + bytes((index,)) if index < 256 else b"j" + _U32(index)


def _int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes((value,))
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    return b"J" + struct.pack("<i", value)


def image(stats: dict[str, Any], core: str = _CORE_MODULES[0]) -> bytes:
    """The .npy member numpy writes for `np.array(stats)` with float32 array leaves."""
    pickler = _Image()
    pickler.stats(stats)
    body = b"".join([_preamble(core), *pickler.out, b"at"])
    body += _put(pickler.memo_size) + b"b."
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (), }"
    header += b" " * (63 - (len(_MAGIC) + 4 + len(header)) % 64) + b"\n"
    return _MAGIC + b"\x01\x00" + struct.pack("<H", len(header)) + header + body


def dumps(stats: dict[str, Any]) -> bytes:
    """NPZ bytes for `stats` (list leaves): what `np.savez(f, np.array(stats_with_float32_arrays))` writes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(_MEMBER, image(stats))
    return buffer.getvalue()


def save(path: str | Path, stats: dict[str, Any]) -> Path:
    return atomic.write_bytes(path, dumps(stats))


def holds(path: str | Path, stats: dict[str, Any]) -> bool:
    """True when the NPZ is byte for byte what numpy writes for `stats` (so it loads to exactly `stats`).

    False means "not proven equal" (another writer, float64 leaves, a stale file): decode and compare.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            raw = archive.read(_MEMBER)
        core = next(c for c in _CORE_MODULES if raw.find(b"c" + c.encode() + b"\n", 0, 200) > 0)
        return raw == image(stats, core)
    except (zipfile.BadZipFile, KeyError, OSError, StopIteration, TypeError, struct.error, OverflowError):
        return False


def _shape_and_flat(value: Any) -> tuple[tuple[int, ...], list[float]]:
    if (
        type(value) is list
        and len(value) == 1
        and type(value[0]) is list
        and len(value[0]) == 1
        and type(value[0][0]) is not list
    ):
        return (1, 1), value[0]  # INC's per-tensor [[v]]: the common case, kept fast
    shape: list[int] = []
    probe = value
    while isinstance(probe, list):
        shape.append(len(probe))
        probe = probe[0] if probe else None
    flat = value
    for _ in range(len(shape) - 1):
        flat = [x for row in flat for x in row]
    return tuple(shape), (flat if shape else [value])
