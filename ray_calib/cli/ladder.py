"""`ray-calib ladder`: a thin command over `ladder.run` with the rungs of `ladder.rungs`."""

from __future__ import annotations

from pathlib import Path

import click

from ray_calib import ui
from ray_calib.cli import options
from ray_calib.cli.options import run_dir_option
from ray_calib.cluster.devices import default_conf_path
from ray_calib.ladder.run import LadderContext, RungFailed, rows, run_ladder, write_results
from ray_calib.ladder.rungs import select
from ray_calib.rundir import RunDir


@click.command()
@options.conf_option()
@click.option("-m", "--model", type=click.Path(file_okay=False, path_type=Path), help="The model the job will use.")
@click.option("--rungs", default=None, help="Rung letters to run, e.g. 'a' [default: every rung].")
@click.option("--accept-new-host-keys", is_flag=True, help="Record unknown SSH host keys (a changed key is refused).")
@run_dir_option
def ladder(conf: Path | None, model: Path | None, rungs: str | None, accept_new_host_keys: bool, run_dir) -> None:
    """Check the cluster rung by rung before the real job; stop at the first failure with host, evidence, fix.

    \b
    Examples:
      ray-calib ladder --conf devices.conf -m /models/DeepSeek-R1
      ray-calib ladder --rungs a
    """
    run = RunDir.resolve(run_dir)
    context = LadderContext(
        conf=Path(conf or default_conf_path()),
        model=model.absolute() if model else None,
        run_dir=run.root,
        accept_new_host_keys=accept_new_host_keys,
    )
    chosen = select(rungs)
    results = run_ladder(chosen, context)
    ui.table("ladder", ("rung", "seconds", "result"), rows(results))
    written = write_results(run.root, results)
    click.echo(f"ladder written to {written}")
    failed = next((r for r in results if not r.ok), None)
    if failed is not None:
        raise RungFailed(f"ladder rung {failed.rung}", failed.result, fix=failed.fix or "see the table.")
