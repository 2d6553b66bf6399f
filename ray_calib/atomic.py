"""Writes that are all-or-nothing: a reader never sees a half-written file.

Everything is first written next to its destination (same file system) under a hidden temporary
name and then moved into place with `os.replace`, which is atomic on POSIX. A failed write removes
its temporary; only a killed process leaves one (`.NAME.XXXX.tmp` files, `.NAME.stage-XXXX` dirs):
`leftovers` finds them and `remove_leftovers` is called by the writers of big outputs on their next run.
A full disk is a `DiskFullError` naming the file and the bytes still needed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray_calib.errors import DiskFullError


def _read_umask() -> int:
    """The process umask: from /proc on Linux (reading it elsewhere means setting it, briefly)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX: the entry lives in the directory, not the file)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # some file systems (NFS, FUSE) refuse fsync on a directory
            os.fsync(fd)
    finally:
        os.close(fd)


def new_temp_file(path: Path, mode: int | None = None) -> tuple[int, str]:
    """(fd, name) of a fresh temp file beside `path`, with the permissions a plain open() would give.

    mkstemp creates 0600 whatever the umask; results (checkpoints, configs, stats) must be readable by
    e.g. a vLLM server running as another user, so they get 0666 & ~umask unless `mode` says otherwise.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, mode if mode is not None else 0o666 & ~_UMASK)
    return fd, tmp


def write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> Path:
    """Write `data` to `path` atomically (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = new_temp_file(path, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise disk_full(err, path, len(data)) from None
        raise
    return path


def disk_full(err: OSError, path: str | os.PathLike, needed: int) -> OSError | DiskFullError:
    """ENOSPC as a DiskFullError naming `path` and the `needed` bytes; any other OSError as it is."""
    if err.errno != errno.ENOSPC:
        return err
    return DiskFullError(path, needed, free_bytes(Path(path)))


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (its nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def is_leftover(path: Path) -> bool:
    """A temporary of this module that only a killed writer leaves behind."""
    name = path.name
    if not name.startswith("."):
        return False
    if path.is_file():
        return name.endswith(".tmp")
    # staged_dir, import-gguf's and pull's staging directories
    return path.is_dir() and (".stage-" in name or ".import-" in name or name.startswith(".ray-calib-pull-"))


def leftovers(directory: str | os.PathLike, depth: int = 1) -> list[tuple[Path, int]]:
    """(path, bytes) of every leftover temporary in `directory` and, with `depth` > 1, its subdirectories."""
    root = Path(directory)
    found: list[tuple[Path, int]] = []
    with contextlib.suppress(OSError):
        for entry in sorted(root.iterdir()):
            if is_leftover(entry):
                found.append((entry, _size(entry)))
            elif depth > 1 and entry.is_dir() and not entry.is_symlink():
                found += leftovers(entry, depth - 1)
    return found


def remove_leftovers(directory: str | os.PathLike) -> tuple[int, int]:
    """Delete the leftover temporaries directly in `directory`: (how many, bytes freed)."""
    found = leftovers(directory)
    for path, _ in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return len(found), sum(size for _, size in found)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory; on success move each file in it into `final`.

    The stage sits beside `final` (same file system). Files are moved one by one (each move atomic),
    only after the caller's block finished without error, so a failure leaves `final` exactly as it
    was (not even created). Existing files of the same name are replaced;
    other files already in `final` are left alone.

    A crash during the moves would leave old and new files of the same names side by side, which no
    reader can tell apart: a marker (`MOVING_MARK`, naming the files) sits in `final` while they move and
    is removed after the last one, so `interrupted_move` tells a reader the directory is not one write.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for old, _ in leftovers(final.parent):  # a killed earlier stage of the same directory
        if old.name.startswith(f".{final.name}.stage-"):
            shutil.rmtree(old, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.stage-", dir=final.parent))
    try:
        yield stage
        final.mkdir(exist_ok=True)
        sources = sorted(stage.rglob("*"))
        files = [str(src.relative_to(stage)) for src in sources if not src.is_dir()]
        write_json(final / MOVING_MARK, {"files": files})
        for src in sources:
            dest = final / src.relative_to(stage)
            if src.is_dir():
                dest.mkdir(exist_ok=True)
            else:
                os.replace(src, dest)
        _fsync_dir(final)
        (final / MOVING_MARK).unlink()
    finally:
        shutil.rmtree(stage, ignore_errors=True)


MOVING_MARK = ".ray_calib_moving.json"


def interrupted_move(directory: str | os.PathLike) -> list[str] | None:
    """The files of a `staged_dir` move into `directory` that stopped part way, or None if none did."""
    path = Path(directory) / MOVING_MARK
    try:
        return list(json.loads(path.read_text()).get("files", []))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError):
        return []  # the marker itself is damaged: the move it guarded did not finish either
