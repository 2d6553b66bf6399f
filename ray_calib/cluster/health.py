"""Which configured nodes Ray sees alive, asked from the GCS directly (no driver, ~1 s).

Nodes are matched by the `ray-calib/node` label `up` gives them, not by IP: Ray rewrites a node IP of
127.0.0.1 to the host's primary address, and several nodes can share a machine.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

from ray_calib.cluster.devices import ClusterConfig
from ray_calib.cluster.preflight import TOKEN_AUTH_FIX, no_token_auth
from ray_calib.cluster.ray_nodes import LABEL_KEY
from ray_calib.errors import ClusterError


@dataclass(frozen=True)
class NodeHealth:
    name: str
    alive: bool
    ray_ip: str = ""
    resources: dict | None = None
    started: float = 0.0  # unix seconds
    death: str = ""


def use_token(token_path: str) -> None:
    """Point this process (and what it spawns, e.g. vLLM's engine core) at the cluster's token.

    Ray's C++ loader aborts with a stack trace on a missing or empty file, so that is checked here.
    """
    path = os.path.expanduser(token_path)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise ClusterError(
            "this machine",
            f"Ray token file {path} is missing or empty",
            fix="run this on the machine that ran `ray-calib up` (or copy its token there), "
            "or `ray-calib up --restart`",
        )
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = path
    _reload_ray_auth()


def _reload_ray_auth() -> None:
    """Ray reads its auth mode and token once per process; one that used Ray before (another cluster, or
    none) would go on sending what it read then and be refused. A connected driver is left alone."""
    import ray

    try:
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]
    except ImportError:  # Ray < 2.52
        raise ClusterError("this machine", no_token_auth(ray.__version__), fix=TOKEN_AUTH_FIX) from None
    if not ray.is_initialized():
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def gcs_reachable(address: str, timeout: float = 2.0) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def node_health(config: ClusterConfig) -> dict[str, NodeHealth]:
    """Health of every configured node; all dead when the head's GCS does not answer."""
    if not gcs_reachable(config.address):
        return {n.name: NodeHealth(n.name, False, death="head GCS not reachable") for n in config.nodes}
    use_token(config.token_path)
    from ray._raylet import GcsClient  # type: ignore[attr-defined]  # ray's _raylet.pyi stub omits GcsClient

    try:
        infos = GcsClient(address=config.address).get_all_node_info(timeout=10)
    except Exception as err:  # RpcError, AuthenticationError: report, don't trace back
        raise ClusterError(
            config.head.label,
            f"GCS at {config.address} did not answer: {err}",
            fix=f"check {config.token_path} matches the cluster's token; `ray-calib up --restart` rebuilds the cluster",
        ) from None
    found: dict[str, NodeHealth] = {}
    for info in sorted(infos.values(), key=lambda i: i.start_time_ms):
        name = dict(info.labels).get(LABEL_KEY)
        if name is None:
            continue
        alive = info.state == 0  # GcsNodeInfo.ALIVE
        if alive or name not in found or not found[name].alive:
            found[name] = NodeHealth(
                name,
                alive,
                info.node_manager_address,
                dict(info.resources_total),
                info.start_time_ms / 1000,
                "" if alive else _death(info),
            )
    return {n.name: found.get(n.name, NodeHealth(n.name, False, death="never joined")) for n in config.nodes}


def _death(info) -> str:
    try:
        return info.death_info.reason_message or "dead"
    except AttributeError:
        return "dead"


def wait_healthy(config: ClusterConfig, device_key: str, timeout: float) -> dict[str, NodeHealth]:
    """Poll until every node is alive and the cluster has TP devices; return the last view either way."""
    deadline = time.monotonic() + timeout
    while True:
        health = node_health(config)
        if all(h.alive for h in health.values()) and devices_alive(health, device_key) >= config.tensor_parallel_size:
            return health
        if time.monotonic() > deadline:
            return health
        time.sleep(0.5)


def devices_alive(health: dict[str, NodeHealth], device_key: str) -> float:
    return sum((h.resources or {}).get(device_key, 0) for h in health.values() if h.alive)
