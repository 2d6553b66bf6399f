"""`ray-calib scales` and `configs`: thin commands over `scales.files` and `scales.quant_config`."""

from __future__ import annotations

from pathlib import Path

import click

from ray_calib.rundir import RunDir, run_dir_option
from ray_calib.scales.devices import DEVICE_TYPES, FP8_FORMATS

_dir = click.Path(file_okay=False, path_type=Path)
_DEVICES = click.Choice(DEVICE_TYPES)


@click.command()
@click.option("--method", help="INC scale method [default: maxabs_hw on Gaudi, maxabs_arbitrary elsewhere].")
@click.option("--device", type=_DEVICES, help="Device the scales are for [default: from the measurements' meta].")
@click.option("--device-for-scales", type=_DEVICES, help="Use another device's scale table (only gaudi2 on gaudi3).")
@click.option("--in", "in_dir", type=_dir, help="Measurement dir [default: <run-dir>/measure].")
@click.option("--out", "out_dir", type=_dir, help="Output dir [default: <run-dir>/scales].")
@click.option("--weights", type=_dir, help="Model dir: weight scales from each rank's shard of the real tensors "
              "(needed by the opt and pcs methods).")
@click.option("--input-backoff", type=float, help="Activation backoff (default 0.25): scale_params.input_backoff in "
              "INC <= 3.4, a dict-form scale_method's backoff in 3.5+.")
@click.option("--weight-backoff", type=float, help="Weight backoff (default 0.5), as --input-backoff.")
@click.option("--output-backoff", type=float, help="INC 3.4 scale_params.output_backoff (row-parallel outputs).")
@click.option("--inc-version", help="INC release the files are for, e.g. 3.4 or 3.8.1 [default: the newest].")
@click.option("--fp8-format", type=click.Choice(FP8_FORMATS, case_sensitive=False), default="E4M3", show_default=True,
              help="QUANT_CONFIG fp8_config (E5M2: Gaudi only).")
@click.option("--allreduce-quantization", is_flag=True, help="QUANT_CONFIG row_parallel_linear_allreduce_quantization.")
@click.option("--blocklist", multiple=True, help="Leave out modules matching this regex (blocklist.names).")
@run_dir_option
def scales(method: str | None, device: str | None, device_for_scales: str | None, in_dir: Path | None,
           out_dir: Path | None, weights: Path | None, input_backoff: float | None, weight_backoff: float | None,
           output_backoff: float | None,
           inc_version: str | None, fp8_format: str, allreduce_quantization: bool, blocklist: tuple[str, ...],
           run_dir: str | None) -> None:
    """Turn range files into INC scale files (<prefix>_hooks_maxabs_<METHOD>_<rank>_<world>.{json,npz}).

    \b
    On Gaudi the files are what INC's QUANTIZE writes for the same ranges, byte for byte in the NPZ.
    Example:
      ray-calib scales --method maxabs_hw --device gaudi3 --blocklist lm_head --in runs/r1/measure
    """
    from ray_calib.scales.files import ScaleRequest, make_scales

    run = RunDir.resolve(run_dir)
    result = make_scales(ScaleRequest(
        in_dir=in_dir or run.measure, out_dir=out_dir or run.scales, method=method, device=device,
        device_for=device_for_scales, weights_dir=weights, input_backoff=input_backoff, weight_backoff=weight_backoff,
        output_backoff=output_backoff, inc_version=inc_version, fp8_format=fp8_format,
        allreduce_quantization=allreduce_quantization, blocklist=blocklist))
    source = f"{result.from_weights} weight scales from {weights}" if weights else "weight scales from measured ranges"
    blocked = f", {result.blocked} blocklisted" if result.blocked else ""
    click.echo(f"wrote {result.ranks} {result.method.file_tag} scale file(s) of {result.nodes} nodes{blocked} to "
               f"{result.out_dir} for {result.device.name} {result.device.fp8_format} (full scale "
               f"{result.device.fullscale:g}, {result.device.math.name} math, INC {result.target.label}); {source}")
    for note in result.notes:
        click.echo(f"note: {note}", err=True)


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
