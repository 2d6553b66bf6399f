"""The `unify` stage as a library: a typed request in, the re-sharded set and the run's record updated.

`run(UnifyRequest)` decides expert parallelism from the run's record (a contradicting flag is refused unless
overridden, and the override recorded), unifies, and records the first target TP of the run, which
`quantize` and `infer` read from then on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ray_calib.measurements.pipeline import UnifySummary, unify_dir
from ray_calib.rundir import RunDir
from ray_calib.runrecord import RunRecord, decide, read_record, record_facts


@dataclass
class UnifyRequest:
    run: RunDir
    to_tp: int
    in_dir: Path | None = None  # None: <run-dir>/measure (then the run's record applies)
    out_dir: Path | None = None  # None: <run-dir>/unified-tp<M> (then the target TP is recorded)
    force: bool = False
    expert_parallel: bool | None = None  # None: the record, the meta, else the model's config.json
    model: Path | None = None  # the measured model [default: the record's, when readable here]
    set_target: bool = False  # make to_tp the run's target although another is recorded
    override_run: bool = False


@dataclass
class UnifyRun:
    summary: UnifySummary
    notes: list[str] = field(default_factory=list)


def run(request: UnifyRequest) -> UnifyRun:
    source = (request.in_dir or request.run.measure).absolute()
    record = read_record(request.run.root) if source == request.run.measure else None  # the run's own files
    ep = decide(
        record,
        "expert_parallel",
        request.expert_parallel,
        flag="--expert-parallel" if request.expert_parallel else "--no-expert-parallel",
        stage="unify",
        override=request.override_run,
    )
    summary = unify_dir(
        source,
        request.out_dir or request.run.unified(request.to_tp),
        request.to_tp,
        force=request.force,
        expert_parallel=request.expert_parallel,
        model=request.model or _recorded_model(record),
        record=record,
    )
    notes = []
    if record is not None and request.out_dir is None:
        notes = _record_target(record, request, [ep.override] if ep.override else [])
    return UnifyRun(summary, notes)


def _recorded_model(record: RunRecord | None) -> Path | None:
    """The measured model's directory from run.json, when its config.json is readable on this machine."""
    model = record.value("model") if record else None
    return Path(model) if model and (Path(model) / "config.json").is_file() else None


def _record_target(record: RunRecord, request: UnifyRequest, overrides: list[dict]) -> list[str]:
    recorded, to_tp = record.value("target_tp"), request.to_tp
    if recorded is not None and recorded != to_tp and not request.set_target:
        record_facts(record, "unify", {}, overrides)
        return [
            f"the run's target stays TP {recorded} ({request.run.unified(recorded).name}, run.json): quantize and "
            f"infer read that; --set-target makes TP {to_tp} the target"
        ]
    if recorded is not None and recorded != to_tp:
        overrides.append({"fact": "target_tp", "was": recorded, "now": to_tp, "by": "unify", "flag": "--set-target"})
    record_facts(record, "unify", {"target_tp": to_tp}, overrides)
    return []
