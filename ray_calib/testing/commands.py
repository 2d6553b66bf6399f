"""`ray-calib make-tiny-model` and `make-calib-set`: tiny real inputs for tests, the demo and trying things out."""

from __future__ import annotations

from pathlib import Path

import click

from ray_calib.data.formats import FORMATS
from ray_calib.testing.tiny.calibset import make_calib_set as write
from ray_calib.testing.tiny.model import ARCHS
from ray_calib.testing.tiny.model import make_tiny_model as build


@click.command("make-tiny-model")
@click.option("--arch", type=click.Choice(ARCHS), required=True, help="Model family to imitate.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Model directory.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same weights and tokenizer.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out.")
def make_tiny_model(arch: str, out: Path, seed: int, force: bool) -> None:
    """Build a random-weight model (bf16 safetensors + trained tokenizer) that vLLM on CPU loads in seconds.

    \b
    Example:
      ray-calib make-tiny-model --arch deepseek_v3 --out models/tiny-ds3
    """
    model = build(arch, out, seed=seed, force=force)
    experts = f", {model.num_experts} routed experts per MoE layer" if model.num_experts else ""
    click.echo(
        f"wrote {model.arch} to {model.path}: {model.num_parameters / 1e6:.1f} M parameters, "
        f"{model.num_layers} layers{experts}, {model.size_bytes / 2**20:.1f} MiB"
    )


@click.command("make-calib-set")
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True, help="Dataset format to write.")
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="File to write (.jsonl for pile/tc, .pkl for mlcommons).",
)
@click.option("-n", "--num-samples", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def make_calib_set(fmt: str, out: Path, num_samples: int, seed: int) -> None:
    """Write a small synthetic calibration set in one of the formats `measure --dataset` reads.

    \b
    Example:
      ray-calib make-calib-set --format mlcommons --out data/calib.pkl --num-samples 128
    """
    path = write(fmt, out, num_samples=num_samples, seed=seed)
    click.echo(f"wrote {num_samples} {fmt} samples to {path}")
