"""Read and write safetensors one tensor at a time, with memory the caller controls.

The format is `u64 header length | JSON header {name: {dtype, shape, data_offsets}, "__metadata__"} |
tensor bytes`. Reading uses positioned reads (`preadv`) into a buffer the caller reuses, instead of
`safe_open`'s mmap: mapped pages stay counted in the process RSS until the file is closed, so a 40 GB
shard would look like 40 GB of memory. Writing lays out the header from the planned shapes first, then
streams each tensor's bytes and hashes them on the way (the checksum that makes `quantize` resumable
needs no second read); numpy suffices for both, torch is imported only for torch tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ray_calib import atomic
from ray_calib.errors import ModelError

# safetensors dtype -> (torch dtype name, bytes per element)
DTYPES = {
    "BF16": ("bfloat16", 2),
    "F16": ("float16", 2),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
_OVERLAP_BYTES = 1 << 20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor table (in file order) and `__metadata__` of one shard, without reading tensor data."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > 100_000_000:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(handle.read(size))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: not a safetensors file ({err})", fix="re-download that shard.") from None
    file_size = path.stat().st_size
    try:
        metadata = header.pop("__metadata__", None) or {}
        start = 8 + size
        tensors = {}
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            tensors[name] = TensorInfo(name, entry["dtype"], tuple(entry["shape"]), start + begin, end - begin)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise ModelError(
            f"{path}: not a safetensors file (bad header: {type(err).__name__} {err})", fix="re-download that shard."
        ) from None
    end = max((info.offset + info.nbytes for info in tensors.values()), default=start)
    if end > file_size:
        raise ModelError(
            f"{path}: truncated ({file_size} bytes, the header needs {end})", fix="re-download that shard."
        )
    return tensors, metadata


class ShardReader:
    """Read single tensors from one shard into fresh buffers (nothing else of the file stays in memory)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def read(self, name: str):
        """A fresh torch tensor holding `name` (for callers that keep it)."""
        import torch

        info = self.tensors[name]
        data = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            self.read_raw(name, data.numpy())
        return data.view(getattr(torch, DTYPES[info.dtype][0])).reshape(info.shape)

    def read_raw(self, name: str, buffer=None):
        """The bytes of `name` as a uint8 numpy array, read into `buffer` (reused by the caller) if given."""
        import numpy as np

        info = self.tensors[name]
        if buffer is None or buffer.size < info.nbytes:
            buffer = np.empty(info.nbytes, dtype=np.uint8)
        return self.read_range(name, 0, buffer[: info.nbytes])

    def map_raw(self, name: str):
        """The bytes of `name` as a uint8 numpy array over a private mapping of the file: no copy.

        Only the tensor's own pages are mapped, and only while the array lives (the mapping goes with
        its last reference), so what counts in RSS is the tensors in hand, not the file. Pages are
        faulted in on first touch, straight from the page cache. Writable copy-on-write: torch can
        view it without a warning; nothing is ever written back.
        """
        import numpy as np

        info = self.tensors[name]
        if info.nbytes == 0:
            return np.empty(0, dtype=np.uint8)
        start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(
            self._fd,
            info.offset + info.nbytes - start,
            flags=mmap.MAP_PRIVATE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=start,
        )
        return np.frombuffer(mapping, dtype=np.uint8, count=info.nbytes, offset=info.offset - start)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading `name` into the page cache (returns at once)."""
        info = self.tensors[name]
        if hasattr(os, "posix_fadvise") and info.nbytes:
            os.posix_fadvise(self._fd, info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)

    def read_range(self, name: str, start: int, view):
        """Fill `view` (a uint8 array) with the bytes of `name` from byte `start` on; returns `view`."""
        info = self.tensors[name]
        if start + view.nbytes > info.nbytes:
            raise AssertionError(f"{name}: bytes {start}..{start + view.nbytes} beyond its {info.nbytes}")
        done, target = 0, memoryview(view).cast("B")
        while done < view.nbytes:  # one read() returns at most ~2 GB on Linux
            got = os.preadv(self._fd, [target[done:]], info.offset + start + done)
            if got <= 0:
                raise ModelError(f"{self.path}: tensor '{name}' is truncated", fix="re-download that shard.")
            done += got
        return view


class PlannedTensor(NamedTuple):
    """One tensor of a shard to write (a tuple: a DeepSeek-R1 quantize plans ~135k of them up front)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * DTYPES[self.dtype][1]


class ShardWriter:
    """Write a shard whose tensor list is known up front; tensors arrive one by one, in plan order.

    Bytes go to a hidden temp file next to `path`; `close()` fsyncs and renames it into place and
    returns the sha256 of the whole file. Leaving the `with` block on an error removes the temp file.
    With `write_behind`, `write_raw` hands the bytes to a writer thread (file write and hashing drop the
    GIL, so they run beside the caller's next cast) and returns a Future: the caller must not reuse the
    buffer before it is done. Writes stay in plan order (one thread).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        plan: list[PlannedTensor],
        metadata: dict[str, str] | None = None,
        *,
        write_behind: bool = False,
    ):
        self.path = Path(path)
        self.plan = plan
        self._writer = None
        self._pending: list = []
        if write_behind:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="write-behind")
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for item in plan:
            header[item.name] = {
                "dtype": item.dtype,
                "shape": list(item.shape),
                "data_offsets": [offset, offset + item.nbytes],
            }
            offset += item.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.size = 8 + len(raw) + offset
        self._next = 0
        self._hash = hashlib.sha256()
        self._hasher: ThreadPoolExecutor | None = None
        self._written_back = 0
        self._done = 0  # bytes handed to the file so far
        fd, self._tmp = atomic.new_temp_file(self.path)
        self._handle = os.fdopen(fd, "wb")
        try:
            self._write(struct.pack("<Q", len(raw)) + raw)
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()

    def _write(self, data) -> None:
        """Append bytes; a full disk becomes a DiskFullError naming the shard and the bytes it still needs."""
        try:
            self._append(data)
        except OSError as err:
            raise atomic.disk_full(err, self.path, self.size - self._done) from None
        self._done += len(data)

    def _append(self, data) -> None:
        """A large block is hashed on a second thread while the file write runs (both drop the GIL)."""
        if len(data) < _OVERLAP_BYTES:
            self._handle.write(data)
            self._hash.update(data)
            return
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="sha256")
        hashed = self._hasher.submit(self._hash.update, data)
        try:
            self._handle.write(data)
            self._start_writeback()
        finally:
            hashed.result()

    def _start_writeback(self) -> None:
        """Let the disk start on what is written so far (the final fsync then waits for little).

        POSIX_FADV_DONTNEED starts asynchronous writeback of dirty pages and drops clean ones, so the
        output does not pile up in the page cache either.
        """
        if not hasattr(os, "posix_fadvise"):
            return
        self._handle.flush()
        end = self._handle.tell()
        os.posix_fadvise(self._handle.fileno(), self._written_back, end - self._written_back, os.POSIX_FADV_DONTNEED)
        self._written_back = end

    def write_raw(self, name: str, data):
        """Write the next planned tensor from its bytes (a contiguous numpy array of the planned dtype's layout).

        Returns None once written, or with `write_behind` a Future that is done once written.
        """
        item = self._expect(name)
        view = memoryview(data).cast("B")
        if view.nbytes != item.nbytes:
            raise AssertionError(f"tensor {name}: {view.nbytes} bytes do not match plan {item}")
        self._next += 1
        if self._writer is None:
            if view.nbytes:
                self._write(view)
            return None
        self._pending = [f for f in self._pending if not f.done() or f.exception() is not None]
        future = self._writer.submit(self._write, view) if view.nbytes else self._writer.submit(lambda: None)
        self._pending.append(future)
        return future

    def write_chunks(self, name: str, chunks) -> None:
        """Write the next planned tensor from an iterable of byte blocks (a large tensor in bounded memory).

        Blocks are written as they come (each may be reused by the caller after the next one is asked for).
        """
        item = self._expect(name)
        self.drain()
        written = 0
        for block in chunks:
            view = memoryview(block).cast("B")
            written += view.nbytes
            if written > item.nbytes:
                raise AssertionError(f"tensor {name}: more than the planned {item.nbytes} bytes")
            self._write(view)
        if written != item.nbytes:
            raise AssertionError(f"tensor {name}: {written} bytes do not match plan {item}")
        self._next += 1

    def drain(self) -> None:
        """Wait until every write handed to the writer thread is on file (re-raising its error)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def _expect(self, name: str) -> PlannedTensor:
        item = self.plan[self._next]
        if name != item.name:
            raise AssertionError(f"tensor {name} written where the plan has {item.name}")
        return item

    def close(self) -> str:
        if self._next != len(self.plan):
            raise AssertionError(f"{self.path.name}: {len(self.plan) - self._next} planned tensors not written")
        self.drain()
        self._stop_writer()
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
        except OSError as err:
            raise atomic.disk_full(err, self.path, self.size - self._done) from None
        os.replace(self._tmp, self.path)
        self._stop_hasher()
        return self._hash.hexdigest()

    def abort(self) -> None:
        """Drop the temporary file, whatever failed (closing flushes, which fails again on a full disk)."""
        try:
            self._stop_writer()  # waits for queued writes: the handle must outlive them
            self._stop_hasher()
            with contextlib.suppress(OSError):
                self._handle.close()
        finally:
            Path(self._tmp).unlink(missing_ok=True)

    def _stop_writer(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def _stop_hasher(self) -> None:
        if self._hasher is not None:
            self._hasher.shutdown()
            self._hasher = None


def file_sha256(path: str | os.PathLike, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
