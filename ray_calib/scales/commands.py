"""`ray-calib scales` and `configs`: thin commands over `scales.files` and `scales.quant_config`."""

from __future__ import annotations

from pathlib import Path

import click

from ray_calib.rundir import RunDir, run_dir_option
from ray_calib.scales.devices import DEVICE_TYPES

_dir = click.Path(file_okay=False, path_type=Path)
_DEVICES = click.Choice(DEVICE_TYPES)


@click.command()
@click.option("--method", help="INC scale method [default: maxabs_hw on Gaudi, maxabs_arbitrary elsewhere].")
@click.option("--device", type=_DEVICES, help="Device the scales are for [default: from the measurements' meta].")
@click.option("--device-for-scales", type=_DEVICES, help="Use another device's scale table (only gaudi2 on gaudi3).")
@click.option("--in", "in_dir", type=_dir, help="Measurement dir [default: <run-dir>/measure].")
@click.option("--out", "out_dir", type=_dir, help="Output dir [default: <run-dir>/scales].")
@click.option("--weights", type=_dir, help="BF16 model dir: weight scales from the real tensors.")
@click.option("--input-backoff", type=float, help="scale_params.input_backoff (default 0.25).")
@click.option("--weight-backoff", type=float, help="scale_params.weight_backoff (default 0.5).")
@run_dir_option
def scales(method: str | None, device: str | None, device_for_scales: str | None, in_dir: Path | None, out_dir: Path | None,
           weights: Path | None, input_backoff: float | None, weight_backoff: float | None, run_dir: str | None) -> None:
    """Turn range files into INC scale files (<prefix>_hooks_maxabs_<METHOD>_<rank>_<world>.{json,npz}).

    \b
    Example:
      ray-calib scales --method maxabs_hw --device gaudi2 --in runs/r1/measure --out runs/r1/scales
    """
    from ray_calib.scales.files import make_scales

    run = RunDir.resolve(run_dir)
    result = make_scales(in_dir or run.measure, out_dir or run.scales, method, device, device_for=device_for_scales,
                         weights_dir=weights, input_backoff=input_backoff, weight_backoff=weight_backoff)
    source = f"{result.from_weights} weight scales from {weights}" if weights else "weight scales from measured ranges"
    click.echo(f"wrote {result.ranks} {result.method.file_tag} scale file(s) of {result.nodes} nodes to "
               f"{result.out_dir} for {result.device.name} (full scale {result.device.fullscale:g}); {source}")


@click.command()
@click.option("--model", help="Model dir or hub id (decides the blocklist: MoE routers stay BF16).")
@click.option("--out", type=_dir, help="Where to write [default: <run-dir>/configs].")
@click.option("--fp8-kv", is_flag=True, help="Measure/quantize the KV cache too.")
@click.option("--one-node", is_flag=True, help="Quantize config for one node: points at the unified measurements.")
@click.option("--unified-tp", type=int, default=8, show_default=True, help="TP of the unified dir (--one-node).")
@click.option("--check", "check", type=click.Path(dir_okay=False, path_type=Path), help="Only validate this file.")
@run_dir_option
def configs(model: str | None, out: Path | None, fp8_kv: bool, one_node: bool, unified_tp: int, check: Path | None,
            run_dir: str | None) -> None:
    """Write the INC QUANT_CONFIGs a run needs (measure + quantize), with absolute dump_stats_path.

    \b
    Examples:
      ray-calib configs --model deepseek-ai/DeepSeek-R1 --fp8-kv --one-node
      ray-calib configs --check my_quant_config.json
    """
    from ray_calib.scales.quant_config import read_config, write_run_configs

    if check:
        read_config(check)
        click.echo(f"{check}: valid")
        return
    if not model:
        raise click.UsageError("--model is required (unless --check FILE)")
    run = RunDir.resolve(run_dir)
    written, stale = write_run_configs(run, model, out or run.configs, fp8_kv=fp8_kv, one_node=one_node,
                                       unified_tp=unified_tp)
    for path in written:
        click.echo(f"wrote {path}")
    if stale:
        click.echo(f"warning: {len(stale)} stale scale file(s) in {stale[0].parent} (e.g. {stale[0].name}) would "
                   "override fresh measurements; `ray-calib quantize --clean-stale-scales` removes them", err=True)
