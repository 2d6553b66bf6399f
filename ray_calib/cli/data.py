"""`ray-calib dataset-info`: what `measure` would run from a calibration file, before starting a cluster."""

from __future__ import annotations

from pathlib import Path

import click

from ray_calib.cli import options
from ray_calib.data.formats import FORMATS
from ray_calib.data.prompts import load_prompts


# -l and -t meant --num-samples and --least-tokens here until they became the letters `measure` uses.
@options.command("dataset-info", renamed={"-t": "-l", "--limit": "--num-samples"})
@click.option("-d", "--dataset", type=click.Path(path_type=Path), required=True, help="Calibration file or directory.")
@click.option(
    "-m",
    "--model",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Model directory whose tokenizer (and chat template) renders the prompts.",
)
@click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default=None, help="Dataset format [default: from the path]."
)
@options.num_samples_option(512)
@options.least_tokens_option()
@click.option("--show", type=click.IntRange(min=0), default=2, show_default=True, help="Print the first N prompts.")
def dataset_info(
    dataset: Path, model: Path, fmt: str | None, num_samples: int, least_tokens: int | None, show: int
) -> None:
    """Load a calibration set the way `measure` does and report samples read, dropped, kept and tokens.

    \b
    Example:
      ray-calib dataset-info -d data/pile.jsonl -m models/tiny-ds3 -l 64 -n 128
    """
    calib = load_prompts(dataset, model, fmt, num_samples=num_samples, least_tokens=least_tokens)
    click.echo(calib.report.summary())
    lengths = [len(ids) for ids in calib.token_ids]
    click.echo(
        f"prompt tokens min/mean/max {min(lengths)}/{sum(lengths) / len(lengths):.1f}/{max(lengths)}; "
        f"dataset hash {calib.dataset_hash[:16]}"
    )
    for prompt in calib.prompts[:show]:
        click.echo(f"--- {len(prompt.token_ids)} tokens\n{prompt.text}")
