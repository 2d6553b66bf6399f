"""Bring a cluster up, look at it, take it down: the procedures behind `up`, `status` and `down`.

`up` runs five named stages, each on all hosts in parallel with one log file per host:

    1/5 ssh        connect to every host, host keys verified against known_hosts
    2/5 preflight  same stack as the head, devices, IFNAME holds the IP, work dir, free disk
    3/5 token      create or reuse the Ray auth token, copy it to every node (SFTP, mode 0600)
    4/5 ray start  stop old Ray on every node (only its temp dir's processes), then start it with the
                   node env: head first, the workers in parallel once the head's GCS listens
    5/5 health     every node alive in the GCS and enough devices for the tensor-parallel size, and
                   bound where devices.conf says (`binding`: node IP, GCS address, node env, listening
                   ports); a node bound elsewhere stops `up` and Ray again

Any failing stage stops `up` and ends with one table of host, verdict and log path. When the inputs
hash as before and every node is alive, `up` does nothing and says so; changed inputs need `--restart`
because Ray keeps the environment it was started with.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ray_calib import __version__, atomic, ui
from ray_calib.cluster import binding, state
from ray_calib.cluster import health as health_mod
from ray_calib.cluster.devices import ClusterConfig, NodeConfig
from ray_calib.cluster.preflight import HostReport, run_preflight
from ray_calib.cluster.ray_nodes import DEVICE_KEYS, ray_log_dir, start_script, stop_script
from ray_calib.cluster.ssh import SSHRunner
from ray_calib.errors import ClusterError

log = logging.getLogger(__name__)
STAGES = ("ssh", "preflight", "token", "ray start", "health")
Row = tuple[str, str, str]  # host, verdict, log path


HOST_TABLE = ("host", "verdict", "log")


@dataclass
class UpResult:
    address: str
    noop: bool
    seconds: float
    rows: list[Row] = field(default_factory=list)
    message: str = ""


def up(config: ClusterConfig, *, restart: bool = False, accept_new_host_keys: bool = False) -> UpResult:
    start = time.monotonic()
    hashes = state.input_hashes(config)
    with state.locked(config.path):
        old = state.read(config.path)
        if old and old.get("status") == "up" and not restart:
            result = _maybe_noop(config, old, hashes)
            if result is not None:
                result.seconds = time.monotonic() - start
                return result
        logs = state.log_dir(config.path)
        with SSHRunner(config, accept_new_host_keys=accept_new_host_keys, log_dir=logs) as runner:
            _stage(1, f"{len(config.nodes)} hosts")
            _require("ssh", config, runner.map(config.nodes, runner.connect), runner)
            _stage(2, "versions, devices, network, disk")
            reports = run_preflight(runner)
            _require_preflight(reports)
            _stage(3, config.token_path)
            token = ensure_token(config.token_path)
            _require(
                "token",
                config,
                runner.map(config.nodes, lambda n: runner.put(n, token, config.token_path, mode=0o600)),
                runner,
            )
            health_mod.use_token(config.token_path)
            state.write(config.path, _record(config, hashes, reports, "starting"))
            _stage(4, f"stop old Ray everywhere, start head {config.head.label}, then {len(config.workers)} worker(s)")
            _require("ray stop", config, runner.map(config.nodes, lambda n: _stop(runner, n)), runner)
            _require("ray start", config, _start_all(runner), runner)
            _stage(5, f"waiting up to {config.health_timeout} s for {len(config.nodes)} nodes")
            rows, health = _health_gate(config, runner)
            _binding_gate(config, runner, health)
        record = _record(config, hashes, reports, "up")
        record["started_at"] = time.time()
        state.write(config.path, record)
    ui.table("up", HOST_TABLE, rows)
    return UpResult(
        config.address,
        False,
        time.monotonic() - start,
        rows,
        f"cluster up at {config.address} ({len(config.nodes)} nodes)",
    )


def _maybe_noop(config: ClusterConfig, old: dict, hashes: dict[str, str]) -> UpResult | None:
    health = health_mod.node_health(config)
    if not all(h.alive for h in health.values()):
        dead = ", ".join(n for n, h in health.items() if not h.alive)
        log.warning("cluster recorded as up but %s not alive: starting it again", dead)
        return None
    state.check_same_inputs(config, old, hashes)
    return UpResult(
        config.address,
        True,
        0.0,
        message=f"cluster at {config.address} already up with "
        f"this config ({len(config.nodes)} nodes alive): nothing to do",
    )


def _stage(index: int, detail: str) -> None:
    ui.stage(index, len(STAGES), STAGES[index - 1], detail)


def _require(what: str, config: ClusterConfig, results: dict, runner: SSHRunner) -> None:
    failed = {name: r for name, r in results.items() if isinstance(r, ClusterError)}
    if not failed:
        return
    rows = [
        (node.label, failed[node.name].detail if node.name in failed else "ok", str(runner.log_path(node)))
        for node in config.nodes
        if node.name in results
    ]
    ui.table(what, HOST_TABLE, rows)
    first = next(iter(failed.values()))
    more = f" (and {len(failed) - 1} more host(s), see the table)" if len(failed) > 1 else ""
    raise ClusterError(first.host, f"{what} failed: {first.detail}{more}", fix=first.fix)


def _require_preflight(reports: list[HostReport]) -> None:
    rows = [(r.node.label, r.verdict, r.log_path) for r in reports]
    bad = [r for r in reports if not r.ok]
    if bad:
        ui.table("preflight", HOST_TABLE, rows)
        diagnosis = " | ".join(f"{r.node.label}: {r.verdict}" for r in bad[1:])
        raise ClusterError(
            bad[0].node.label,
            f"preflight failed: {bad[0].verdict}" + (f" | {diagnosis}" if diagnosis else ""),
            fix="fix those hosts (the seeds need an identical stack everywhere), then rerun up",
        )


def ensure_token(token_path: str) -> bytes:
    """Reuse the local token or create one (0600); its value is never printed or logged."""
    path = Path(os.path.expanduser(token_path))
    if path.is_file() and path.read_bytes().strip():
        return path.read_bytes().strip()
    token = secrets.token_hex(32).encode()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic.write_bytes(path, token, mode=0o600)
    log.info("created a new Ray auth token at %s", path)
    return token


def _start_all(runner: SSHRunner) -> dict[str, None | ClusterError]:
    """Start the head; start the workers as soon as its GCS port accepts connections.

    The head's `ray start` goes on for seconds after the GCS listens (dashboard, client server);
    workers only need the GCS, so they join meanwhile instead of after it.
    """
    config = runner.config
    with ThreadPoolExecutor(max_workers=1) as pool:
        head = pool.submit(runner.map, (config.head,), lambda n: _start(runner, n))
        while not head.done() and not health_mod.gcs_reachable(config.address, timeout=0.5):
            time.sleep(0.1)
        if head.done() and isinstance(head.result()[config.head.name], ClusterError):
            return head.result()
        workers = runner.map(config.workers, lambda n: _start(runner, n))
        return {**head.result(), **workers}


def _start(runner: SSHRunner, node: NodeConfig) -> None:
    result = runner.run(node, start_script(node, runner.config), timeout=300, what=f"ray start ({node.role})")
    if not result.ok:
        raise ClusterError(
            node.label,
            f"ray start failed: {result.tail()}",
            fix=f"see {runner.log_path(node)} and {node.ssh_host}:{ray_log_dir(node)}",
        )


def _stop(runner: SSHRunner, node: NodeConfig) -> str:
    """Stop the node's Ray (scoped to its temp dir); return the probe's JSON line."""
    result = runner.run(node, stop_script(node, runner.config), timeout=120, what="stop ray")
    if not result.ok:
        raise ClusterError(
            node.label,
            f"stopping Ray failed: {result.tail()}",
            fix=f"see {runner.log_path(node)}; stop it there by hand",
        )
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def _health_gate(config: ClusterConfig, runner: SSHRunner) -> tuple[list[Row], dict]:
    key = DEVICE_KEYS[config.head.device_kind]
    health = health_mod.wait_healthy(config, key, config.health_timeout)
    rows = []
    for node in config.nodes:
        h = health[node.name]
        verdict = (
            f"alive as {h.ray_ip}, {key}={(h.resources or {}).get(key, 0):g}" if h.alive else f"NOT ALIVE ({h.death})"
        )
        rows.append((node.label, verdict, f"{runner.log_path(node)}; {node.ssh_host}:{ray_log_dir(node)}"))
    dead = [n for n in config.nodes if not health[n.name].alive]
    if dead:
        ui.table("health", HOST_TABLE, rows)
        node = dead[0]
        raise ClusterError(
            node.label,
            f"not alive in Ray after {config.health_timeout} s ({health[node.name].death})",
            fix=f"read {node.ssh_host}:{ray_log_dir(node)}/raylet.out "
            f"and {runner.log_path(node)}; then `ray-calib up --restart`",
        )
    found = health_mod.devices_alive(health, key)
    if found < config.tensor_parallel_size:
        raise ClusterError(
            config.head.label,
            f"only {found:g} {key} devices alive, tp({config.tensor_parallel_size}) needs more",
            fix="check DEVICES per node or lower TENSOR_PARALLEL_SIZE",
        )
    return rows, health


def _binding_gate(config: ClusterConfig, runner: SSHRunner, health: dict) -> list[binding.Binding]:
    """Every node runs where devices.conf says; otherwise Ray is stopped again and `up` fails naming it."""
    results = runner.map(
        config.nodes, lambda n: runner.run(n, binding.probe_script(n), timeout=60, what="binding probe")
    )
    found = []
    for node in config.nodes:
        result = results[node.name]
        if isinstance(result, ClusterError):
            raise result
        try:
            facts = binding.parse(result.stdout)
        except ValueError:
            raise ClusterError(
                node.label, f"binding probe failed: {result.tail()}", fix=f"see {runner.log_path(node)}"
            ) from None
        found.append(binding.problems(node, config, facts, health[node.name].ray_ip, listening=not config.listen_all))
    bad = [b for b in found if b.problems]
    if bad:
        runner.map(config.nodes, lambda n: _stop(runner, n))
        rows = [(b.node.label, "; ".join(b.problems) or f"on {b.node.ip}", str(runner.log_path(b.node))) for b in found]
        ui.table("binding", HOST_TABLE, rows)
        first = bad[0]
        raise ClusterError(
            first.node.label,
            f"not bound where configured: {'; '.join(first.problems)} (Ray stopped again on every node)",
            fix=binding.fix(first),
        )
    return found


def _record(config: ClusterConfig, hashes: dict, reports: list[HostReport], status: str) -> dict:
    return {
        "status": status,
        "conf": str(config.path),
        "address": config.address,
        "token_path": config.token_path,
        "inputs": hashes,
        "ray_calib": __version__,
        "device_key": DEVICE_KEYS[config.head.device_kind],
        "tensor_parallel_size": config.tensor_parallel_size,
        "nodes": [
            {
                "name": r.node.name,
                "role": r.node.role,
                "ip": r.node.ip,
                "ssh_host": r.node.ssh_host,
                "device_kind": r.node.device_kind,
                "devices": r.node.devices,
                "temp_dir": r.node.temp_dir,
                "python": r.facts.get("python"),
                "packages": r.facts.get("packages", {}),
                "log": r.log_path,
                "ray_logs": ray_log_dir(r.node),
            }
            for r in reports
        ],
    }


def down(config: ClusterConfig, *, accept_new_host_keys: bool = False) -> list[Row]:
    """Stop Ray on every node of the config (not only those `up` reached); forget the cluster once all stopped."""
    with (
        state.locked(config.path),
        SSHRunner(config, accept_new_host_keys=accept_new_host_keys, log_dir=state.log_dir(config.path)) as runner,
    ):
        results = runner.map(config.nodes, lambda n: _stop(runner, n))
        rows = [
            (
                n.label,
                _stopped(results[n.name]),
                str(runner.log_path(n)),
            )
            for n in config.nodes
        ]
        failed = [n for n in config.nodes if isinstance(results[n.name], ClusterError)]
        if not failed:  # a node that may still run Ray keeps the state, so `status` and a rerun still see it
            state.remove(config.path)
    ui.table("down", HOST_TABLE, rows)
    if failed:
        raise ClusterError(
            failed[0].label,
            f"Ray may still run on {', '.join(n.label for n in failed)}",
            fix="fix SSH to those hosts and rerun `ray-calib down`, or run `ray stop` there",
        )
    return rows


def _stopped(result: str | ClusterError) -> str:
    """The `down` table's detail for one node: its error, or how many Ray processes `_stop` ended."""
    return result.detail if isinstance(result, ClusterError) else f"stopped ({_count(result)} processes)"


def _count(stdout: str) -> str:
    try:
        return str(json.loads(stdout)["stopped"])
    except (ValueError, KeyError, TypeError):
        return "?"


@dataclass(frozen=True)
class NodeStatus:
    node: NodeConfig
    alive: bool
    ray_ip: str
    devices: str
    versions: str
    uptime_s: float
    detail: str
    logs: str


def status(config: ClusterConfig) -> tuple[dict | None, list[NodeStatus]]:
    """The recorded cluster (None when `up` never ran for this config) and each node's live view."""
    record = state.read(config.path)
    if record is None:
        return None, []
    health = health_mod.node_health(config)
    by_name = {n["name"]: n for n in record.get("nodes", [])}
    now = time.time()
    rows = []
    for node in config.nodes:
        h, saved = health[node.name], by_name.get(node.name, {})
        packages = saved.get("packages", {})
        versions = " / ".join(
            str(v) for v in (saved.get("python"), packages.get("ray"), packages.get("torch"), packages.get("vllm"))
        )
        count = (h.resources or {}).get(record.get("device_key", "HPU"), 0)
        rows.append(
            NodeStatus(
                node,
                h.alive,
                h.ray_ip,
                f"{node.device_kind} x{count:g}" if h.alive else f"{node.device_kind} x{node.devices} (configured)",
                versions,
                now - h.started if h.alive and h.started else 0.0,
                h.death,
                f"{saved.get('log', '')}; {node.ssh_host}:{ray_log_dir(node)}",
            )
        )
    return record, rows


def dead_node_error(config: ClusterConfig, rows: list[NodeStatus]) -> ClusterError | None:
    dead = [r for r in rows if not r.alive]
    if not dead:
        return None
    first = dead[0]
    names = ", ".join(r.node.label for r in dead)
    return ClusterError(
        first.node.label,
        f"Ray node(s) not alive: {names} ({first.detail}); logs: {first.logs}",
        fix="read the logs, then `ray-calib up` to start it again",
    )
