"""`ray-calib report`: PNG plots and a short summary of one run, optionally compared with others."""

from __future__ import annotations

from pathlib import Path

import click

from ray_calib.cli.options import run_dir_option
from ray_calib.report.build import build_report
from ray_calib.rundir import RunDir

_dir = click.Path(file_okay=False, path_type=Path)


@click.command()
@click.argument("run", required=False, type=_dir)
@click.option("--compare", multiple=True, type=_dir, help="Another run (or measurement directory) to draw alongside.")
@click.option("-o", "--out", type=_dir, help="Where the PNGs and summary.txt go [default: <run>/report].")
@run_dir_option
def report(run: Path | None, compare: tuple[Path, ...], out: Path | None, run_dir: str | None) -> None:
    """Plot KV cache ranges across runs, expert coverage and per-layer activation/weight ranges.

    \b
    RUN is a run directory or a directory of INC range files [default: --run-dir].
    Example:
      ray-calib report runs/pile-1024 --compare runs/pile-256 --compare runs/mlcommons
    """
    root = run or RunDir.resolve(run_dir).root
    result = build_report(root, list(compare), out or RunDir(root.absolute()).report)
    click.echo(result.summary)
    click.echo(f"wrote {len(result.plots)} plots and summary.txt to {result.out}")
