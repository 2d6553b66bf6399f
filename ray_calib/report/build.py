"""`ray-calib report`: load one or more runs, bring each to TP1, plot, and summarise in a few lines.

A run is a run directory (its `measure/`, else its smallest `unified-tp<M>/`) or a directory holding
INC range files directly (e.g. someone else's measurement). Files are read only via
`ray_calib.inc`; TP>1 sets are unified to TP1 in memory by `ray_calib.measurements` (element-wise max, experts placed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ray_calib import atomic
from ray_calib.errors import MeasurementError, UnifyError
from ray_calib.inc import ExpertCoverage, MeasurementSet, RunMeta, read_coverage
from ray_calib.measurements import unify_ranks
from ray_calib.measurements.pipeline import decide_expert_parallel
from ray_calib.report import plots
from ray_calib.report.extract import RunFigures, figures
from ray_calib.rundir import RunDir
from ray_calib.runrecord import run_measurements

SUMMARY_FILE = "summary.txt"


@dataclass
class LoadedRun:
    label: str
    directory: Path  # the measurement directory actually read
    world_size: int
    meta: RunMeta | None
    figures: RunFigures
    coverage: ExpertCoverage | None


@dataclass
class Report:
    out: Path
    runs: list[LoadedRun]
    plots: list[Path] = field(default_factory=list)
    summary: str = ""


def measurement_dir(path: Path) -> Path:
    """Where the range files of `path` are: `measure/`, else the run's unified directory, else itself."""
    path = Path(path)
    if not path.is_dir():
        raise MeasurementError(
            path, "is not a directory", fix="pass a run directory or a directory of INC range files."
        )
    run = RunDir(path.absolute())
    if run.measure.is_dir():
        return run.measure
    return run_measurements(run) or path


def load_run(path: Path) -> LoadedRun:
    directory = measurement_dir(path)
    measurement = MeasurementSet.discover(directory)
    rank_files = measurement.read_all(check_npz=False, strict=False)
    tp1 = rank_files[0]
    if measurement.world_size > 1:  # experts merged as `unify` merges them (TP-sharded or expert parallel)
        expert_parallel = _expert_parallel(measurement)
        tp1 = unify_ranks(rank_files, 1, expert_parallel=expert_parallel)[0]
    coverage = read_coverage(directory)
    return LoadedRun(
        label=_label(Path(path), measurement.meta),
        directory=directory,
        world_size=measurement.world_size,
        meta=measurement.meta,
        figures=figures(tp1),
        coverage=coverage,
    )


def _expert_parallel(measurement: MeasurementSet) -> bool:
    """As `unify` decides it. Undecided (INC's own files: no meta, no config.json here) the figures take the
    ranks as expert parallel, the layout upstream's EP runs write; unify itself refuses to guess."""
    try:
        return decide_expert_parallel(measurement, None)[0]
    except UnifyError:
        return True


def _label(path: Path, meta: RunMeta | None) -> str:
    name = path.absolute().name
    if meta is None:
        return name
    parts = [
        Path(meta.dataset).name if meta.dataset else None,
        f"{meta.num_samples} samples" if meta.num_samples else None,
        f"{meta.num_tokens // meta.num_samples} tok/sample" if meta.num_tokens and meta.num_samples else None,
    ]
    details = [d for d in parts if d]
    return f"{name} ({', '.join(details)})" if details else name


def build_report(run_dir: Path, compare: list[Path], out: Path) -> Report:
    runs = [load_run(run_dir), *(load_run(path) for path in compare)]
    labels = _unique([run.label for run in runs])
    by_label = dict(zip(labels, (run.figures for run in runs)))
    report = Report(out=out, runs=runs)
    made = [plots.kv_plot(by_label, out / "kv_cache_maxabs.png"), plots.ranges_plot(by_label, out / "layer_ranges.png")]
    for index, run in enumerate(runs):
        if run.coverage and run.coverage.experts:
            suffix = "" if index == 0 else f"_{index}"
            made.append(plots.coverage_plot(run.coverage, labels[index], out / f"expert_coverage{suffix}.png"))
    report.plots = [p for p in made if p is not None]
    report.summary = summarise(runs, labels, report.plots)
    atomic.write_text(out / SUMMARY_FILE, report.summary + "\n")
    return report


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def summarise(runs: list[LoadedRun], labels: list[str], made: list[Path]) -> str:
    lines = []
    for run, label in zip(runs, labels):
        fig = run.figures
        lines.append(
            f"{label}: {run.directory} (TP{run.world_size} -> TP1, {fig.num_nodes} nodes, "
            f"{len(fig.weights.high)} layers)"
        )
        for kind, per_layer in sorted(fig.kv.items()):
            layer = max(per_layer, key=per_layer.__getitem__)
            lines.append(
                f"  {kind} cache maxabs: max {per_layer[layer]:.4g} at layer {layer}, "
                f"min {min(per_layer.values()):.4g} over {len(per_layer)} layers"
            )
        if not fig.kv:
            lines.append("  KV cache: not measured (measure with --fp8-kv to record it)")
        for what, ranges in (("activation", fig.activations), ("weight", fig.weights)):
            if ranges.high:
                layer = max(ranges.high, key=ranges.high.__getitem__)
                lines.append(f"  largest {what} maxabs {ranges.high[layer]:.4g}: {ranges.top_module[layer]}")
        lines.append("  " + _coverage_line(run.coverage))
        if fig.non_finite:
            lines.append(f"  {len(fig.non_finite)} nodes hold NaN/inf (left out), e.g. {fig.non_finite[0]}")
    lines.append("plots: " + (", ".join(p.name for p in made) or "none"))
    return "\n".join(lines)


def _coverage_line(coverage: ExpertCoverage | None) -> str:
    if coverage is None:
        return "expert coverage: no coverage.json (dense model, or measured by INC)"
    total = sum(len(c) for c in coverage.experts.values())
    never = coverage.never_hit()
    missing = sum(len(e) for e in never.values())
    least = min((n for counts in coverage.experts.values() for n in counts), default=0)
    text = f"expert coverage: {total - missing}/{total} experts saw tokens (fewest: {least} tokens)"
    if missing:
        first = next(iter(never.items()))
        text += f"; never hit: {missing}, e.g. {first[0]} experts {first[1][:8]}"
    return text
