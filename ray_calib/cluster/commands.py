"""`ray-calib config check`, `up`, `status`, `down`: thin commands over `cluster.lifecycle`."""

from __future__ import annotations

from pathlib import Path

import click

_conf = click.option("--conf", "conf", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="devices.conf [default: $RAY_CALIB_DEVICES_CONF or ./devices.conf].")
_accept = click.option("--accept-new-host-keys", is_flag=True,
                       help="Record unknown SSH host keys in known_hosts (changed keys are still refused).")


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _table(title: str, header: tuple[str, ...], rows: list[tuple]) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for name in header:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*(str(c) for c in row))
    _console().print(table)


def _reporter():
    from ray_calib.cluster.lifecycle import STAGES, Reporter

    class RichReporter(Reporter):
        def stage(self, index: int, name: str, detail: str = "") -> None:
            _console().print(f"[bold]({index}/{len(STAGES)} {name})[/bold] {detail}")

        def table(self, title: str, rows: list) -> None:
            _table(title, ("host", "verdict", "log"), rows)

    return RichReporter()


@click.group("config")
def config() -> None:
    """Validate the cluster description (devices.conf)."""


@config.command("check")
@click.argument("conf", required=False, type=click.Path(dir_okay=False, path_type=Path))
def check(conf: Path | None) -> None:
    """Check devices.conf: keys, IPs, duplicate nodes, files; every problem with its line number.

    \b
    Example:
      ray-calib config check cluster/devices.conf
    """
    from ray_calib.cluster.devices import load

    cfg = load(conf)
    rows = [(n.name, n.ip, n.ifname or "-", f"{n.ssh_user}@{n.ssh_host}:{n.ssh_port}",
             f"{n.device_kind} x{n.devices}", n.source_file or "-", n.temp_dir) for n in cfg.nodes]
    _table(f"{cfg.path}: ok", ("node", "ip", "ifname", "ssh", "devices", "env file", "ray temp dir"), rows)
    click.echo(f"ray at {cfg.address}, tp {cfg.tensor_parallel_size}, work dir {cfg.work_dir}, "
               f"token {cfg.token_path}")
    _warn_env_files(cfg)


def _warn_env_files(cfg) -> None:
    from ray_calib.cluster.envfiles import lint_conf

    for warning in lint_conf(cfg):
        click.echo(f"warning: {warning}", err=True)


@click.command()
@_conf
@click.option("--restart", is_flag=True, help="Restart Ray on every node even if it runs (after env changes).")
@_accept
def up(conf: Path | None, restart: bool, accept_new_host_keys: bool) -> None:
    """Start Ray on every node of devices.conf over SSH, after a preflight of all hosts.

    \b
    Example:
      ray-calib up --conf devices.conf && ray-calib measure --fp8-kv
    """
    from ray_calib.cluster import devices, lifecycle

    cfg = devices.load(conf)
    _warn_env_files(cfg)
    result = lifecycle.up(cfg, restart=restart, accept_new_host_keys=accept_new_host_keys, reporter=_reporter())
    click.echo(f"{result.message} in {result.seconds:.1f} s")


@click.command()
@_conf
def status(conf: Path | None) -> None:
    """Show every node: IPs, devices, versions, liveness, uptime, logs."""
    from ray_calib.cluster import devices, lifecycle

    cfg = devices.load(conf)
    record, rows = lifecycle.status(cfg)
    if record is None:
        click.echo(f"no cluster started by `ray-calib up` for {cfg.path}")
        return
    table = [(r.node.name, f"{r.node.ip} (ray {r.ray_ip or '-'})", r.devices, r.versions,
              "alive" if r.alive else f"DEAD: {r.detail}", f"{r.uptime_s / 60:.1f} min" if r.alive else "-",
              r.logs) for r in rows]
    _table(f"cluster {record['address']} ({record['status']})",
           ("node", "ip", "devices", "python / ray / torch / vllm", "state", "uptime", "logs"), table)
    error = lifecycle.dead_node_error(cfg, rows)
    if error is not None:
        raise error


@click.command()
@_conf
@_accept
def down(conf: Path | None, accept_new_host_keys: bool) -> None:
    """Stop Ray on every node named in devices.conf, even after a partial `up`."""
    from ray_calib.cluster import devices, lifecycle

    lifecycle.down(devices.load(conf), accept_new_host_keys=accept_new_host_keys, reporter=_reporter())
    click.echo("cluster down")
