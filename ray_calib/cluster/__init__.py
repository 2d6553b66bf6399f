"""Cluster bring-up from devices.conf over SSH: `ray-calib cluster check / up / status / down`.

    binding    does Ray run where devices.conf says (the last check of `up`, every node)
    bindshim   the bind() interposer: Ray's wildcard listeners on the node's IP
    envfiles   side effects of the node env files ray-calib sources
    health     which configured nodes Ray sees alive (from the GCS, ~1 s)
    hlsmi      which Gaudi a node has and its HBM, without opening a card
    lifecycle  the procedures behind `up`, `status` and `down`
    preflight  what must hold on every host before any Ray process starts
    ray_nodes  a node's environment, `ray start` for head and workers, a scoped stop
    ssh        SSHRunner: paramiko, host keys verified, (rc, stdout, stderr)
    state      what `up` started, on disk, so later commands find the cluster

Other stages use one function, `connect()`, to run on the cluster `up` started.
Importing this package loads neither Ray nor paramiko.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from ray_calib import ui
from ray_calib.cluster import devices, health, lifecycle, state
from ray_calib.cluster.bindshim import BIND_IP_VAR, library_path
from ray_calib.errors import ClusterError

__all__ = ["connect"]


def connect(conf_path: Path | str | None = None) -> str:
    """Make this process a client of the cluster `ray-calib up` started, and return its address.

    Contract:
      - `conf_path`: the devices.conf given to `up` (default: env RAY_CALIB_DEVICES_CONF, else
        ./devices.conf). The state file is found from it (under env RAY_CALIB_STATE_DIR, default
        ~/.ray-calib).
      - Raises `ClusterError` (a user-facing one-line error, no traceback) when: no cluster was started
        for that config; devices.conf or a node env file changed since `up` (Ray still runs with the old
        env: `up --restart`); or any configured node is not alive in Ray -- the message names the node
        (e.g. "worker1 (127.0.0.2)") and its log paths (local up log and the node's Ray log dir).
      - On success sets in `os.environ`: RAY_ADDRESS=<head ip>:<port>, RAY_AUTH_MODE=token and
        RAY_AUTH_TOKEN_PATH=<the token file>, so `ray.init()` here and in processes started from here
        (vLLM's engine core calls `ray.init()` itself) join this cluster with token auth.
      - Does not call `ray.init()` and imports only Ray's GCS client, so callers keep control of
        `ray.init` arguments (runtime_env, namespace). The token value is never printed.
    """
    config = devices.load(conf_path)
    record = state.read(config.path)
    if record is None or record.get("status") != "up":
        raise ClusterError(
            config.head.label,
            f"no cluster is up for {config.path}",
            fix=f"run `ray-calib up --conf {config.path}` first",
        )
    state.check_same_inputs(config, record, state.input_hashes(config))
    _, rows = lifecycle.status(config)
    error = lifecycle.dead_node_error(config, rows)
    if error is not None:
        raise error
    health.use_token(record["token_path"])
    os.environ["RAY_ADDRESS"] = record["address"]
    _bind_this_process(config)
    return record["address"]


def _bind_this_process(config) -> None:
    """A driver on the head joins Ray as a worker of its own, whose ports would listen on every interface:
    the `ray-calib` command re-runs itself once with the head's bind shim preloaded (see bindshim)."""
    library = library_path(config.head)
    if config.listen_all or os.environ.get(BIND_IP_VAR) or not ui.own_process() or not os.path.isfile(library):
        return
    try:
        with socket.socket(socket.AF_INET6 if ":" in config.head.ip else socket.AF_INET) as probe:
            probe.bind((config.head.ip, 0))  # only an address of this machine binds
    except OSError:
        return
    preload = ":".join(p for p in (library, os.environ.get("LD_PRELOAD")) if p)
    ui.end_library_logs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    env = {**os.environ, BIND_IP_VAR: config.head.ip, "LD_PRELOAD": preload}
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
