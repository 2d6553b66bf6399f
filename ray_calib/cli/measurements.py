"""`ray-calib unify`, `expand` and `inspect`: thin commands over `measurements.stage` and `.pipeline`."""

from __future__ import annotations

from pathlib import Path

import click

from ray_calib import ui
from ray_calib.cli.options import override_run_option, run_dir_option
from ray_calib.measurements import stage
from ray_calib.measurements.pipeline import expand_dir, inspect_dir
from ray_calib.rundir import RunDir

_dir = click.Path(file_okay=False, path_type=Path)


@click.command()
@click.option("--to-tp", "to_tp", type=int, required=True, help="Target tensor-parallel size M (divides N).")
@click.option("--in", "in_dir", type=_dir, help="Measurement directory at TP=N [default: <run-dir>/measure].")
@click.option("-o", "--out", "out_dir", type=_dir, help="Output directory [default: <run-dir>/unified-tp<M>].")
@click.option("--force", is_flag=True, help="Replace another run's stats files in --out.")
@click.option(
    "--expert-parallel/--no-expert-parallel",
    default=None,
    help="Ranks hold different experts (concatenate) or shards of all (max) [default: the run's record or the "
    "meta's ep_size, else the files checked against the model's config.json; refused when neither says].",
)
@click.option("--model", type=_dir, help="The measured model, whose config.json decides expert parallelism.")
@click.option(
    "--set-target",
    is_flag=True,
    help="Make M the run's target TP (run.json) although another is recorded; quantize and infer read it.",
)
@override_run_option
@run_dir_option
def unify(
    to_tp: int,
    in_dir: Path | None,
    out_dir: Path | None,
    force: bool,
    expert_parallel: bool | None,
    model: Path | None,
    set_target: bool,
    override_run: bool,
    run_dir: str | None,
) -> None:
    """Re-shard per-rank measurements from TP=N to TP=M (e.g. 16 -> 8 for one 8-card node).

    The first unify of a run records M as the run's target TP in run.json: quantize and infer read
    unified-tp<M> from then on; another --to-tp writes its directory and leaves the target alone.

    \b
    Example:
      ray-calib unify --to-tp 8 --in runs/r1/measure --out runs/r1/unified-tp8
    """
    result = stage.run(
        stage.UnifyRequest(
            run=RunDir.resolve(run_dir),
            to_tp=to_tp,
            in_dir=in_dir,
            out_dir=out_dir,
            force=force,
            expert_parallel=expert_parallel,
            model=model,
            set_target=set_target,
            override_run=override_run,
        )
    )
    summary = result.summary
    rows = [
        ("ranks", summary.ranks_in, summary.ranks_out),
        ("nodes per rank", summary.nodes_in, summary.nodes_out),
        ("experts per layer and rank", summary.experts_in, summary.experts_out),
    ]
    ui.table(f"unify {summary.in_dir} -> {summary.out_dir}", ("", "in", "out"), rows)
    mode = "expert-parallel (experts concatenated)" if summary.expert_parallel else "element-wise max"
    extra = f"; scale files unified too: {', '.join(summary.scale_methods)}" if summary.scale_methods else ""
    click.echo(f"{mode} ({summary.ep_reason}){extra}; {summary.seconds:.2f} s")
    for note in result.notes:
        ui.note(note)


@click.command()
@click.option("--to-ranks", "to_ranks", type=int, required=True, help="Number of expert-parallel ranks W.")
@click.option("--in", "in_dir", type=_dir, help="TP1 unified directory [default: <run-dir>/unified-tp1].")
@click.option("-o", "--out", "out_dir", type=_dir, help="Output directory [default: <run-dir>/expanded-ep<W>].")
@click.option("--force", is_flag=True, help="Replace another run's stats files in --out.")
@run_dir_option
def expand(to_ranks: int, in_dir: Path | None, out_dir: Path | None, force: bool, run_dir: str | None) -> None:
    """Split a TP1 measurement into W rank files for expert-parallel serving.

    \b
    Example:
      ray-calib expand --to-ranks 8 --in runs/r1/unified-tp1 --out runs/r1/ep8
    """
    run = RunDir.resolve(run_dir)
    out = out_dir or run.expanded(to_ranks)
    outputs = expand_dir(in_dir or run.unified(1), out, to_ranks, force=force)
    first = outputs[0].name.method
    same = [o for o in outputs if o.name.method == first]
    methods = sorted({o.name.method for o in outputs if o.name.method and o.name.method != first})
    kind = f"{first} scale" if first else "rank"
    extra = f"; scale files expanded too: {', '.join(methods)}" if methods else ""
    click.echo(f"wrote {len(same)} {kind} files of {len(same[0].nodes)} nodes each to {out}{extra}")


@click.command()
@click.argument("directory", type=_dir)
def inspect(directory: Path) -> None:
    """Show what a measurement directory holds: ranks, nodes, module families, bad values, device meta.

    \b
    Example:
      ray-calib inspect runs/r1/measure
    """
    report = inspect_dir(directory)
    nodes = sorted(set(report.nodes_per_rank))
    kind = "" if report.has_ranges else f" (no range files; {report.scale_methods[0]} scale files)"
    click.echo(
        f"{report.directory}: prefix '{report.prefix}'{kind}, world size {report.world_size}, "
        f"nodes per rank {'/'.join(map(str, nodes))}, routed experts per rank {report.experts_per_rank}"
    )
    values = report.values
    click.echo(f"values: {values['finite']} finite, {values['zero']} zero, {values['nan']} NaN, {values['inf']} inf")
    for method, scale_set in report.scale_sets.items():
        counts = scale_set.values
        click.echo(
            f"scale files {method}: nodes per rank {'/'.join(map(str, sorted(set(scale_set.nodes_per_rank))))}, "
            f"values {counts['finite']} finite, {counts['zero']} zero, {counts['nan']} NaN, {counts['inf']} inf"
        )
    ui.table("module families (rank 0)", ("family", "nodes"), report.families.most_common())
    if report.meta:
        shown = {k: v for k, v in report.meta.to_json().items() if v not in (None, [], {})}
        ui.table("ray_calib_meta.json", ("field", "value"), sorted(shown.items()))
    else:
        click.echo("no ray_calib_meta.json (plain INC output: device and dataset unknown)")
