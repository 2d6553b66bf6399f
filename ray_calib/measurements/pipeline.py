"""Directory-level unify / expand / inspect: read a run, check it, transform it, write it atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ray_calib.atomic import staged_dir
from ray_calib.errors import OutputExistsError, UnifyError
from ray_calib.inc.coverage import COVERAGE_FILE
from ray_calib.inc.experts import expert_layout
from ray_calib.inc.meta import RunMeta, write_meta
from ray_calib.inc.naming import JSON, NPZ, StatsName, parse_name
from ray_calib.inc.rankfile import RankFile, node_values, read_rank_file, write_rank_file
from ray_calib.inc.runset import MeasurementSet
from ray_calib.measurements import hessians
from ray_calib.measurements.unify import check_same_nodes, check_sizes, expand_rank, merge_group
from ray_calib.model.config import num_routed_experts
from ray_calib.runrecord import RunRecord, check_rank_files


@dataclass
class UnifySummary:
    in_dir: Path
    out_dir: Path
    ranks_in: int
    ranks_out: int
    nodes_in: int
    nodes_out: int
    experts_in: int  # routed experts per MoE layer held by one rank (0: dense model)
    experts_out: int
    expert_parallel: bool
    scale_methods: list[str]
    seconds: float
    ep_reason: str = ""  # how expert parallelism was decided (flag, meta, files + config.json)


def unify_dir(
    in_dir: Path,
    out_dir: Path,
    to_world_size: int,
    *,
    force: bool = False,
    expert_parallel: bool | None = None,
    model: Path | None = None,
    record: RunRecord | None = None,
) -> UnifySummary:
    """Unify the measurement set in `in_dir` (and any scale sets beside it) to `to_world_size` ranks.

    `expert_parallel`: the user's explicit choice; None decides from the meta's ep_size, else from the
    files checked against `model`'s (or the meta's model's) config.json (see `decide_expert_parallel`).
    `record`: the run's record; rank files that are not its own are refused before anything is written.
    Target ranks are independent, so their groups are read, merged and written by a pool of processes
    (one per core); the parent only checks that all groups saw the same modules and commits the result.
    """
    with _no_cycle_collection():
        return _unify_dir(in_dir, out_dir, to_world_size, force, expert_parallel, model, record)


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Stats are acyclic trees of small lists: CPython's cycle scans over them would cost half the run."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _unify_dir(
    in_dir: Path,
    out_dir: Path,
    to_world_size: int,
    force: bool,
    explicit_ep: bool | None,
    model: Path | None,
    record: RunRecord | None,
) -> UnifySummary:
    start = time.perf_counter()
    sets = MeasurementSet.discover_all(in_dir)
    measurement = sets[0]  # the range files, or the first scale set when the directory holds only scale files
    if record is not None:
        ranges = [s for s in sets if s.method is None]  # scale files are derived later, by INC or `scales`
        files = [n.file(s.directory, kind) for s in ranges for n in s.names for kind in (JSON, NPZ)]
        check_rank_files(record, in_dir, measurement.meta.run_id if measurement.meta else None, files)
    check_sizes(measurement.world_size, to_world_size)
    _check_output(in_dir, out_dir, measurement, to_world_size, force)
    layout = expert_layout(measurement.read(0, check_npz=False))
    expert_parallel, reason = decide_expert_parallel(measurement, explicit_ep, layout, model=model)
    source = measurement.meta or RunMeta()
    has_experts = layout.has_experts
    ep_out = to_world_size if expert_parallel else (1 if has_experts else source.ep_size)
    meta = dataclasses.replace(source, tp_size=to_world_size, unified_from=measurement.world_size, ep_size=ep_out)
    with staged_dir(out_dir) as stage:
        task = functools.partial(
            _unify_group, stage=stage, to_world_size=to_world_size, expert_parallel=expert_parallel
        )
        results = _parallel_map(task, [(run, i) for run in sets for i in range(to_world_size)])
        _check_groups_agree(results)
        _finish_stage(stage, out_dir, meta, in_dir, {r.stem for r in results})
        hessians.remove_stale(out_dir, {hessians.MODEL_FILE} if hessians.unify(in_dir, stage) else set())
    first = results[0]
    return UnifySummary(
        in_dir=in_dir,
        out_dir=out_dir,
        ranks_in=measurement.world_size,
        ranks_out=to_world_size,
        nodes_in=first.nodes_in,
        nodes_out=first.nodes_out,
        experts_in=first.experts_in,
        experts_out=first.experts_out,
        expert_parallel=first.expert_parallel,
        scale_methods=[s.method for s in sets if s.method],
        seconds=time.perf_counter() - start,
        ep_reason=reason,
    )


@dataclass
class _GroupResult:
    stem: str  # of the written file
    source: tuple[Path, StatsName]  # the group's first source rank, for error messages
    digest: str  # of the source node names: equal for every group of a consistent run
    nodes_in: int
    nodes_out: int
    experts_in: int
    experts_out: int
    expert_parallel: bool


def _unify_group(
    task: tuple[MeasurementSet, int], *, stage: Path, to_world_size: int, expert_parallel: bool | None
) -> _GroupResult:
    run, target_rank = task
    group = run.world_size // to_world_size
    members = [run.read(j) for j in range(target_rank * group, (target_rank + 1) * group)]
    check_same_nodes(members)
    merged = merge_group(members, target_rank, to_world_size, expert_parallel=expert_parallel)
    write_rank_file(merged, stage)
    digest = hashlib.blake2b("\n".join(sorted(members[0].nodes)).encode(), digest_size=16).hexdigest()
    layout_in, layout_out = expert_layout(members[0]), expert_layout(merged)
    return _GroupResult(
        stem=merged.name.stem,
        source=(run.directory, members[0].name),
        digest=digest,
        nodes_in=len(members[0].nodes),
        nodes_out=len(merged.nodes),
        experts_in=layout_in.local_experts,
        experts_out=layout_out.local_experts,
        expert_parallel=layout_out.local_experts > layout_in.local_experts,
    )


def _parallel_map(function, tasks: list) -> list:
    """Forked workers (no start-up cost) from a single-threaded process; from one with other threads (a test
    runner, a library caller) a fork can copy a lock another thread holds and hang, so forkserver there."""
    workers = min(os.cpu_count() or 1, len(tasks))
    if workers < 2:
        return [function(task) for task in tasks]
    method = "fork" if threading.active_count() == 1 else "forkserver"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        return pool.map(function, tasks, chunksize=-(-len(tasks) // workers))


def _check_groups_agree(results: list[_GroupResult]) -> None:
    """Groups check their own members; across groups (per file set) compare digests, explain a mismatch in full."""
    references: dict[str | None, _GroupResult] = {}
    for result in results:
        reference = references.setdefault(result.source[1].method, result)
        if result.digest != reference.digest:
            pair = [
                read_rank_file(directory, name, check_npz=False)
                for directory, name in (reference.source, result.source)
            ]
            check_same_nodes(pair)


def expand_dir(in_dir: Path, out_dir: Path, to_world_size: int, *, force: bool = False) -> list[RankFile]:
    """Expand a TP1 (unified) measurement, and the scale files beside it, into `to_world_size` rank files."""
    sets = MeasurementSet.discover_all(in_dir)
    measurement = sets[0]
    if measurement.world_size != 1:
        raise UnifyError(
            f"{in_dir} holds {measurement.world_size} ranks; expand starts from one",
            fix=f"run `ray-calib unify --to-tp 1 --in {in_dir}` first.",
        )
    _check_output(in_dir, out_dir, measurement, to_world_size, force)
    sources = [run.read(0) for run in sets]
    outputs = [rank_file for source in sources for rank_file in expand_rank(source, to_world_size)]
    meta = measurement.meta or RunMeta()
    experts = expert_layout(sources[0]).has_experts
    meta = dataclasses.replace(meta, tp_size=to_world_size, ep_size=to_world_size if experts else meta.ep_size)
    _write(out_dir, outputs, meta, in_dir)
    return outputs


def decide_expert_parallel(
    measurement: MeasurementSet, explicit: bool | None, layout=None, *, model: Path | None = None
) -> tuple[bool, str]:
    """Whether the ranks hold different experts (concatenate them) or shards of all of them (max-merge).

    One explicit decision: the user's flag, else the meta's ep_size (measure writes it), else the file
    layout checked against the model's config.json (`model`, else the model the meta names): each rank
    holding all `n_routed_experts` means TP-sharded experts, never EP; E local experts on N ranks with
    E * N = n_routed_experts means EP. Files with none of these are refused: guessing wrong multiplies
    the experts (Maverick's 128 on 8 ranks would become 1,024) or merges different experts' ranges.
    """
    layout = layout or expert_layout(measurement.read(0, check_npz=False))
    local = layout.local_experts
    routed = _routed_experts(measurement.meta, model)
    world = measurement.world_size
    if explicit is not None or not local:
        if explicit and local and routed and local == routed:
            raise UnifyError(
                f"--expert-parallel, but every rank of {measurement.directory} holds all {routed} routed "
                "experts (TP-sharded experts, not expert parallel)",
                fix="drop --expert-parallel (or pass --no-expert-parallel).",
            )
        if explicit and local and routed and local * world != routed:
            raise UnifyError(
                f"--expert-parallel, but {world} ranks x {local} experts != {routed} routed experts",
                fix="check that these files come from an expert-parallel run of this model.",
            )
        if explicit is None:
            return False, "dense model (no routed experts)"
        return bool(explicit and local), f"{'--expert-parallel' if explicit else '--no-expert-parallel'} given"
    meta_ep = measurement.meta.ep_size if measurement.meta else None
    if meta_ep is not None:
        return meta_ep > 1, f"ep_size {meta_ep} in {measurement.directory.name}/ray_calib_meta.json"
    if routed:
        if local == routed:
            return False, f"every rank holds all {routed} routed experts (config.json): TP-sharded experts"
        if local * world == routed:
            return True, f"{world} ranks x {local} experts = {routed} routed experts (config.json)"
        raise UnifyError(
            f"{measurement.directory}: {world} ranks x {local} experts fits neither TP-sharded nor "
            f"expert-parallel experts of a model with {routed} routed experts",
            fix="check the files belong to this model, or pass --expert-parallel / --no-expert-parallel.",
        )
    raise UnifyError(
        f"{measurement.directory}: {world} ranks hold {local} routed experts each, and neither an ep_size in "
        "ray_calib_meta.json nor a readable config.json says whether they are shards of all experts "
        "or different experts",
        fix="pass --model BF16_DIR (its config.json decides), or --no-expert-parallel / --expert-parallel.",
    )


def _routed_experts(meta: RunMeta | None, model: Path | None = None) -> int | None:
    """n_routed_experts of `model`, else of the model the meta names, when its config.json is readable here."""
    directory = model or (Path(meta.model) if meta and meta.model else None)
    if directory is None:
        return None

    path = Path(directory) / "config.json"
    try:
        return num_routed_experts(json.loads(path.read_text())) or None
    except (OSError, ValueError):
        if model is not None:
            raise UnifyError(
                f"--model {model}: no readable config.json", fix="pass the BF16 model directory that was measured."
            ) from None
        return None


def _check_output(in_dir: Path, out_dir: Path, measurement: MeasurementSet, to_world_size: int, force: bool) -> None:
    if out_dir.resolve() == in_dir.resolve():
        raise UnifyError(f"--out {out_dir} is the input directory", fix="write the result to another directory.")
    if not out_dir.exists() or force:
        return
    expected = {(measurement.prefix, to_world_size)}
    found = {
        (parsed[0].prefix, parsed[0].world_size)
        for p in out_dir.iterdir()
        if (parsed := parse_name(p)) and parsed[1] == JSON
    }
    if found - expected:
        prefix, world_size = sorted(found - expected, key=str)[0]
        raise OutputExistsError(
            f"{out_dir} already holds another run ('{prefix}', world size {world_size})",
            fix="choose another --out, or pass --force to replace its stats files.",
        )


def _write(out_dir: Path, outputs: list[RankFile], meta: RunMeta, in_dir: Path) -> None:
    """Everything lands in a staging directory first: a failure leaves `out_dir` untouched."""
    with staged_dir(out_dir) as stage:
        for rank_file in outputs:
            write_rank_file(rank_file, stage)
        _finish_stage(stage, out_dir, meta, in_dir, {rank_file.name.stem for rank_file in outputs})


def _finish_stage(stage: Path, out_dir: Path, meta: RunMeta, in_dir: Path, keep: set[str]) -> None:
    """Meta and the input's coverage beside the new rank files; another run's files in `out_dir` removed."""
    write_meta(stage, meta)
    if (in_dir / COVERAGE_FILE).exists():
        shutil.copy2(in_dir / COVERAGE_FILE, stage / COVERAGE_FILE)
    remove_stale(out_dir, keep)


def remove_stale(out_dir: Path, keep: set[str]) -> None:
    """With --force, stats files of another run in `out_dir` must go, or the next reader sees two runs."""
    for path in out_dir.iterdir() if out_dir.is_dir() else ():
        parsed = parse_name(path)
        if parsed and parsed[0].stem not in keep:
            path.unlink()


# ---- inspect ------------------------------------------------------------------------------------------

_INDEX_RE = re.compile(r"\.\d+(?=\.|$)")


@dataclass
class Inspection:
    directory: Path
    prefix: str
    world_size: int
    nodes_per_rank: list[int]
    families: Counter = field(default_factory=Counter)  # module family (indices as *) -> nodes on rank 0
    values: Counter = field(default_factory=Counter)  # "finite", "zero", "nan", "inf" over all leaves
    experts_per_rank: int = 0
    scale_methods: list[str] = field(default_factory=list)
    meta: RunMeta | None = None
    scale_sets: dict[str, Inspection] = field(default_factory=dict)  # METHOD -> the same figures for its files
    has_ranges: bool = True


def inspect_dir(directory: Path) -> Inspection:
    """Summarize what a measurement directory holds (range and scale files), counting NaN/inf/zero."""
    sets = MeasurementSet.discover_all(directory)
    reports = [_inspect_set(directory, run) for run in sets]
    report = reports[0]
    report.has_ranges = sets[0].method is None
    report.scale_methods = [run.method for run in sets if run.method]
    report.scale_sets = {run.method: one for run, one in zip(sets, reports) if run.method and one is not report}
    return report


def _inspect_set(directory: Path, measurement: MeasurementSet) -> Inspection:
    rank_files = measurement.read_all(strict=False)
    report = Inspection(
        directory=directory,
        prefix=measurement.prefix,
        world_size=measurement.world_size,
        nodes_per_rank=[len(r.nodes) for r in rank_files],
        meta=measurement.meta,
        experts_per_rank=expert_layout(rank_files[0]).local_experts,
    )
    report.families.update(_INDEX_RE.sub(".*", module) for module in rank_files[0].nodes)
    for rank_file in rank_files:
        for node in rank_file.nodes.values():
            for value in node_values(node):
                report.values[_classify(value)] += 1
    return report


def _classify(value: float) -> str:
    if value != value:
        return "nan"
    if math.isinf(value):
        return "inf"
    return "zero" if value == 0 else "finite"
