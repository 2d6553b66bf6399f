"""`ray-calib scales` and `quant-config write|check`: thin commands over `scales.files` and `inc.quant_config`."""

from __future__ import annotations

from pathlib import Path

import click

from ray_calib import ui
from ray_calib.cli import options
from ray_calib.cli.options import run_dir_option
from ray_calib.inc.devices import DEVICE_TYPES, FP8_FORMATS
from ray_calib.inc.quant_config import read_config, write_run_configs
from ray_calib.rundir import RunDir
from ray_calib.scales.files import ScaleRequest, make_scales

_dir = click.Path(file_okay=False, path_type=Path)
_DEVICES = click.Choice(DEVICE_TYPES)


@options.command(renamed={"--method": "--scale-method"})
@options.scale_method_option("INC scale method [default: maxabs_hw on Gaudi, maxabs_arbitrary elsewhere].")
@options.device_option("Device the scales are for [default: from the measurements' meta].")
@click.option("--device-for-scales", type=_DEVICES, help="Use another device's scale table (only gaudi2 on gaudi3).")
@click.option("--in", "in_dir", type=_dir, help="Measurement dir [default: <run-dir>/measure].")
@options.out_option("Output dir [default: <run-dir>/scales].", dest="out_dir")
@click.option(
    "--weights",
    type=_dir,
    help="Model dir: weight scales from each rank's shard of the real tensors (needed by the opt and pcs methods).",
)
@click.option(
    "--input-backoff",
    type=float,
    help="Activation backoff (default 0.25): scale_params.input_backoff in "
    "INC <= 3.4, a dict-form scale_method's backoff in 3.5+.",
)
@click.option("--weight-backoff", type=float, help="Weight backoff (default 0.5), as --input-backoff.")
@click.option("--output-backoff", type=float, help="INC 3.4 scale_params.output_backoff (row-parallel outputs).")
@click.option("--inc-version", help="INC release the files are for, e.g. 3.4 or 3.8.1 [default: the newest].")
@click.option(
    "--fp8-format",
    type=click.Choice(FP8_FORMATS, case_sensitive=False),
    default="E4M3",
    show_default=True,
    help="QUANT_CONFIG fp8_config (E5M2: Gaudi only).",
)
@click.option("--allreduce-quantization", is_flag=True, help="QUANT_CONFIG row_parallel_linear_allreduce_quantization.")
@click.option("--blocklist", multiple=True, help="Leave out modules matching this regex (blocklist.names).")
@run_dir_option
def scales(
    scale_method: str | None,
    device: str | None,
    device_for_scales: str | None,
    in_dir: Path | None,
    out_dir: Path | None,
    weights: Path | None,
    input_backoff: float | None,
    weight_backoff: float | None,
    output_backoff: float | None,
    inc_version: str | None,
    fp8_format: str,
    allreduce_quantization: bool,
    blocklist: tuple[str, ...],
    run_dir: str | None,
) -> None:
    """Turn range files into INC scale files (<prefix>_hooks_maxabs_<METHOD>_<rank>_<world>.{json,npz}).

    \b
    On Gaudi the files are what INC's QUANTIZE writes for the same ranges, byte for byte in the NPZ.
    Example:
      ray-calib scales --scale-method maxabs_hw --device gaudi3 --blocklist lm_head --in runs/r1/measure
    """
    run = RunDir.resolve(run_dir)
    result = make_scales(
        ScaleRequest(
            in_dir=in_dir or run.measure,
            out_dir=out_dir or run.scales,
            method=scale_method,
            device=device,
            device_for=device_for_scales,
            weights_dir=weights,
            input_backoff=input_backoff,
            weight_backoff=weight_backoff,
            output_backoff=output_backoff,
            inc_version=inc_version,
            fp8_format=fp8_format,
            allreduce_quantization=allreduce_quantization,
            blocklist=blocklist,
        )
    )
    source = f"{result.from_weights} weight scales from {weights}" if weights else "weight scales from measured ranges"
    blocked = f", {result.blocked} blocklisted" if result.blocked else ""
    click.echo(
        f"wrote {result.ranks} {result.method.file_tag} scale file(s) of {result.nodes} nodes{blocked} to "
        f"{result.out_dir} for {result.device.name} {result.device.fp8_format} (full scale "
        f"{result.device.fullscale:g}, {result.device.math.name} math, INC {result.target.label}); {source}"
    )
    for note in result.notes:
        ui.note(f"note: {note}")


@click.group("quant-config")
def quant_config() -> None:
    """INC QUANT_CONFIG files: write the ones a run needs, or check one."""


_model = click.option(
    "--model", required=True, help="Model dir or hub id (decides the blocklist: MoE routers stay BF16)."
)
_out = options.out_option("Where to write [default: <run-dir>/configs].")
_fp8_kv = click.option("--fp8-kv", is_flag=True, help="Measure/quantize the KV cache too.")
_one_node = click.option(
    "--one-node", is_flag=True, help="Quantize config for one node: points at the unified measurements."
)
_unified_tp = click.option(
    "--unified-tp", type=int, default=8, show_default=True, help="TP of the unified dir (--one-node)."
)


@quant_config.command("write", cls=options.Command)
@_model
@_out
@_fp8_kv
@_one_node
@_unified_tp
@run_dir_option
def write(model: str, out: Path | None, fp8_kv: bool, one_node: bool, unified_tp: int, run_dir: str | None) -> None:
    """Write the INC QUANT_CONFIGs a run needs (measure + quantize), with absolute dump_stats_path.

    \b
    Example:
      ray-calib quant-config write --model deepseek-ai/DeepSeek-R1 --fp8-kv --one-node
    """
    _write(model, out, fp8_kv, one_node, unified_tp, run_dir)


@quant_config.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def check(file: Path) -> None:
    """Validate one QUANT_CONFIG: keys, values, paths; every problem with the fix.

    \b
    Example:
      ray-calib quant-config check my_quant_config.json
    """
    _check(file)


@click.command(hidden=True)
@click.option("--model")
@_out
@_fp8_kv
@_one_node
@_unified_tp
@click.option("--check", "check", type=click.Path(dir_okay=False, path_type=Path))
@run_dir_option
def configs(
    model: str | None,
    out: Path | None,
    fp8_kv: bool,
    one_node: bool,
    unified_tp: int,
    check: Path | None,
    run_dir: str | None,
) -> None:
    """Deprecated: `ray-calib quant-config write` and `ray-calib quant-config check FILE`."""
    if check:
        options.deprecated("`ray-calib configs --check FILE`", "`ray-calib quant-config check FILE`")
        _check(check)
        return
    options.deprecated("`ray-calib configs`", "`ray-calib quant-config write`")
    if not model:
        raise click.UsageError("--model is required (unless --check FILE)")
    _write(model, out, fp8_kv, one_node, unified_tp, run_dir)


def _check(path: Path) -> None:
    read_config(path)
    ui.result(f"{path}: valid")


def _write(model: str, out: Path | None, fp8_kv: bool, one_node: bool, unified_tp: int, run_dir: str | None) -> None:
    run = RunDir.resolve(run_dir)
    written, stale = write_run_configs(
        run, model, out or run.configs, fp8_kv=fp8_kv, one_node=one_node, unified_tp=unified_tp
    )
    for path in written:
        ui.result(f"wrote {path}")
    if stale:
        ui.warn(
            f"{len(stale)} stale scale file(s) in {stale[0].parent} (e.g. {stale[0].name}) would "
            "override fresh measurements; `ray-calib quantize --clean-stale-scales` removes them"
        )
