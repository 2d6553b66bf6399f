"""`ray-calib push` and `pull`: publish a calibration run on the Hugging Face hub and fetch one back."""

from __future__ import annotations

from pathlib import Path

import click

from ray_calib.cli import options
from ray_calib.cli.options import run_dir_option
from ray_calib.hub.transfer import pull as download
from ray_calib.hub.transfer import push as upload
from ray_calib.rundir import RunDir


@click.command()
@click.option("--repo", required=True, help="Hub repo id, ORG/NAME (created if missing).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option(
    "--include-checkpoint",
    is_flag=True,
    help="Also upload the FP8 checkpoint (<run-dir>/fp8) and the hessians GPTQ rounded it with.",
)
@click.option(
    "--no-verify",
    is_flag=True,
    help="Push without a passed `eval --min-agreement` of the run's checkpoint (the card says so).",
)
@run_dir_option
def push(repo: str, private: bool, include_checkpoint: bool, no_verify: bool, run_dir: str | None) -> None:
    """Upload a run (measurements at any TP, unified sets, QUANT_CONFIGs, meta, coverage, report) with a model card.

    Only a checked run: by default eval.json must hold a passed `eval --min-agreement` of the checkpoint
    in <run-dir>/fp8 as it is now. logs/ and infer/ stay local.

    \b
    Token from HF_TOKEN or `hf auth login`; endpoint from HF_ENDPOINT.
    Example:
      ray-calib push --repo my-org/DeepSeek-R1-fp8-calib --run-dir runs/r1
    """
    result = upload(
        RunDir.resolve(run_dir), repo, private=private, include_checkpoint=include_checkpoint, verify=not no_verify
    )
    click.echo(f"pushed {len(result.files)} files ({result.num_bytes / 2**20:.1f} MiB) to {result.url}")
    click.echo(f"commit: {result.commit_url}")


@options.command(renamed={"--to": "--out"})
@click.option("--repo", required=True, help="Hub repo id, ORG/NAME.")
@options.out_option("Run directory to download into (its configs then point at it).", required=True, dest="to")
@click.option("--revision", default=None, help="Branch, tag or commit [default: main].")
@click.option("--force", is_flag=True, help="Replace files of the same name already in --to.")
def pull(repo: str, to: Path, revision: str | None, force: bool) -> None:
    """Download pre-measured results into a run directory, ready for `quantize` / `infer`.

    \b
    Example:
      ray-calib pull --repo my-org/DeepSeek-R1-fp8-calib --to runs/r1
    """
    result = download(repo, to, revision=revision, force=force)
    click.echo(f"pulled {len(result.files)} files from {repo} into {result.directory}")
    if result.configs_rewritten:
        click.echo(f"dump_stats_path now points into {result.directory} in: {', '.join(result.configs_rewritten)}")
