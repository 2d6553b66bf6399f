"""What `up` started, kept on disk so `status`, `down`, `measure` and `infer` find the cluster.

    $RAY_CALIB_STATE_DIR (default ~/.ray-calib)/
      clusters/<hash of the devices.conf path>/
        state.json        the cluster record (address, nodes, versions, input hashes)
        lock              flock held by up/down while they change the cluster
        logs/<node>.log   what every remote command printed, per node

The input hashes (devices.conf content as parsed, each node env file) make `up` a no-op when nothing
changed, and let it say what changed when something did.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ray_calib import atomic
from ray_calib.cluster.devices import ClusterConfig
from ray_calib.errors import ClusterError

log = logging.getLogger(__name__)
STATE_VERSION = 1


def state_root() -> Path:
    return Path(os.environ.get("RAY_CALIB_STATE_DIR") or Path.home() / ".ray-calib")


def cluster_dir(conf_path: Path) -> Path:
    key = hashlib.sha256(str(Path(conf_path).absolute()).encode()).hexdigest()[:12]
    return state_root() / "clusters" / f"{Path(conf_path).stem}-{key}"


def state_path(conf_path: Path) -> Path:
    return cluster_dir(conf_path) / "state.json"


def log_dir(conf_path: Path) -> Path:
    return cluster_dir(conf_path) / "logs"


def input_hashes(config: ClusterConfig) -> dict[str, str]:
    """One hash per input Ray is started with; env files are read where `up` runs (shared storage)."""
    hashes = {"devices.conf": config.fingerprint()}
    for node in config.nodes:
        if node.source_file:
            path = Path(node.source_file)
            content = path.read_bytes() if path.is_file() else b"<missing>"
            hashes[f"{node.name} env file {node.source_file}"] = hashlib.sha256(content).hexdigest()
    return hashes


def changed_inputs(old: dict[str, str], new: dict[str, str]) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def check_same_inputs(config, record: dict, hashes: dict[str, str]) -> None:
    """Ray keeps the environment it was started with: a changed devices.conf or env file needs --restart."""
    changed = changed_inputs(record.get("inputs", {}), hashes)
    if changed:
        raise ClusterError(
            config.head.label,
            f"running cluster was started with other inputs (changed: "
            f"{', '.join(changed)}); Ray keeps the environment it was started with",
            fix="run `ray-calib up --restart` to restart Ray on every node",
        )


def read(conf_path: Path) -> dict | None:
    path = state_path(conf_path)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ClusterError(
            "state", f"{path} is unreadable ({err})", fix="run `ray-calib down` then `ray-calib up` to rebuild it"
        ) from None
    return state if state.get("version") == STATE_VERSION else None


def write(conf_path: Path, state: dict) -> Path:
    state = {"version": STATE_VERSION, **state}
    return atomic.write_json(state_path(conf_path), state)


def remove(conf_path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        state_path(conf_path).unlink()


@contextlib.contextmanager
def locked(conf_path: Path, *, timeout: float = 900) -> Iterator[None]:
    """Hold the cluster's lock; say who holds it while waiting, give up after `timeout` seconds."""
    path = cluster_dir(conf_path) / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline, told = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    handle.seek(0)
                    log.warning("waiting for %s (held by pid %s)", path, handle.read().strip() or "?")
                    told = True
                if time.monotonic() > deadline:
                    raise ClusterError(
                        "state",
                        f"{path} still locked after {timeout:.0f} s",
                        fix="wait for the other `ray-calib up/down` to finish",
                    ) from None
                time.sleep(0.2)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
