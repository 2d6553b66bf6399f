"""`ray-calib cluster check`, `up`, `status`, `down`: thin commands over `cluster.lifecycle`."""

from __future__ import annotations

from pathlib import Path

import click

from ray_calib import ui
from ray_calib.cli import options
from ray_calib.cluster import devices, lifecycle
from ray_calib.cluster.devices import load
from ray_calib.cluster.envfiles import lint_conf

_conf = options.conf_option()
_accept = click.option(
    "--accept-new-host-keys",
    is_flag=True,
    help="Record unknown SSH host keys in known_hosts (changed keys are still refused).",
)


@click.group("cluster")
def cluster() -> None:
    """Check the cluster description (devices.conf); `up`, `status` and `down` run the cluster itself."""


@cluster.command("check", cls=options.Command)
@_conf
def check(conf: Path | None) -> None:
    """Check devices.conf: keys, IPs, duplicate nodes, files; every problem with its line number.

    \b
    Example:
      ray-calib cluster check --conf cluster/devices.conf
    """
    _check(conf)


@click.group("config", hidden=True)
def config() -> None:
    """Deprecated: `ray-calib cluster check --conf devices.conf`."""


@config.command("check")
@click.argument("conf", required=False, type=click.Path(dir_okay=False, path_type=Path))
def config_check(conf: Path | None) -> None:
    """Deprecated spelling of `ray-calib cluster check --conf CONF`."""
    options.deprecated("`ray-calib config check CONF`", "`ray-calib cluster check --conf CONF`")
    _check(conf)


def _check(conf: Path | None) -> None:
    cfg = load(conf)
    rows = [
        (
            n.name,
            n.ip,
            n.ifname or "-",
            f"{n.ssh_user}@{n.ssh_host}:{n.ssh_port}",
            f"{n.device_kind} x{n.devices}",
            n.source_file or "-",
            n.temp_dir,
        )
        for n in cfg.nodes
    ]
    ui.table(f"{cfg.path}: ok", ("node", "ip", "ifname", "ssh", "devices", "env file", "ray temp dir"), rows)
    ui.result(f"ray at {cfg.address}, tp {cfg.tensor_parallel_size}, work dir {cfg.work_dir}, token {cfg.token_path}")
    _warn_env_files(cfg)


def _warn_env_files(cfg) -> None:
    for warning in lint_conf(cfg):
        ui.warn(warning)


@click.command()
@_conf
@click.option("--restart", is_flag=True, help="Restart Ray on every node even if it runs (after env changes).")
@_accept
def up(conf: Path | None, restart: bool, accept_new_host_keys: bool) -> None:
    """Start Ray on every node of devices.conf over SSH, after a preflight of all hosts.

    \b
    Example:
      ray-calib up --conf devices.conf && ray-calib measure --conf devices.conf --fp8-kv
    """
    cfg = devices.load(conf)
    _warn_env_files(cfg)
    result = lifecycle.up(cfg, restart=restart, accept_new_host_keys=accept_new_host_keys)
    ui.result(f"{result.message} in {result.seconds:.1f} s")


@click.command()
@_conf
def status(conf: Path | None) -> None:
    """Show every node: IPs, devices, versions, liveness, uptime, logs."""
    cfg = devices.load(conf)
    record, rows = lifecycle.status(cfg)
    if record is None:
        ui.result(f"no cluster started by `ray-calib up` for {cfg.path}")
        return
    table = [
        (
            r.node.name,
            f"{r.node.ip} (ray {r.ray_ip or '-'})",
            r.devices,
            r.versions,
            "alive" if r.alive else f"DEAD: {r.detail}",
            f"{r.uptime_s / 60:.1f} min" if r.alive else "-",
            r.logs,
        )
        for r in rows
    ]
    ui.table(
        f"cluster {record['address']} ({record['status']})",
        ("node", "ip", "devices", "python / ray / torch / vllm", "state", "uptime", "logs"),
        table,
    )
    error = lifecycle.dead_node_error(cfg, rows)
    if error is not None:
        raise error


@click.command()
@_conf
@_accept
def down(conf: Path | None, accept_new_host_keys: bool) -> None:
    """Stop Ray on every node named in devices.conf, even after a partial `up`."""
    lifecycle.down(devices.load(conf), accept_new_host_keys=accept_new_host_keys)
    ui.result("cluster down")
