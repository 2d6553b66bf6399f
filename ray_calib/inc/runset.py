""" "The N rank files of one run": found in a directory, checked complete, read on demand."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ray_calib.atomic import interrupted_move
from ray_calib.errors import MeasurementError
from ray_calib.inc.meta import RunMeta, read_meta
from ray_calib.inc.naming import JSON, StatsName, parse_name
from ray_calib.inc.rankfile import RankFile, read_rank_file


@dataclass
class MeasurementSet:
    directory: Path
    names: list[StatsName]  # sorted by rank, exactly ranks 0..world_size-1 (or one unranked file)
    meta: RunMeta | None

    @property
    def prefix(self) -> str:
        return self.names[0].prefix

    @property
    def method(self) -> str | None:
        return self.names[0].method

    @property
    def world_size(self) -> int:
        return self.names[0].world_size or 1

    @classmethod
    def discover(cls, directory: str | Path, *, method: str | None = None) -> MeasurementSet:
        """Find the one complete run in `directory`: range files by default, scale files with `method`."""
        directory = Path(directory)
        if not directory.is_dir():
            raise MeasurementError(
                directory,
                "is not a directory",
                fix="pass the directory of dump_stats_path (the one holding *_hooks_maxabs_*.json).",
            )
        moving = interrupted_move(directory)
        if moving is not None:
            raise MeasurementError(
                directory,
                f"a write of {len(moving)} file(s) was interrupted part way, so files of "
                "two runs may sit side by side under the same names",
                fix="re-run the command that wrote this directory (with --force).",
            )
        groups: dict[tuple, list[StatsName]] = defaultdict(list)
        for path in directory.iterdir():
            parsed = parse_name(path)
            if parsed and parsed[1] == JSON and parsed[0].method == method:
                groups[parsed[0].run_key].append(parsed[0])
        if not groups and method is None and scale_methods(directory):
            raise MeasurementError(
                directory,
                f"holds INC scale files ({', '.join(scale_methods(directory))}) but no "
                "range files (<prefix>_hooks_maxabs_<rank>_<world>.json)",
                fix="scales are made from ranges: give the directory INC's MEASURE wrote them to.",
            )
        if not groups:
            kind = f"{method} scale" if method else "measurement"
            raise MeasurementError(
                directory,
                f"holds no INC {kind} files (<prefix>_hooks_maxabs_"
                f"{method + '_' if method else ''}<rank>_<world>.json)",
                fix="give the directory of QUANT_CONFIG's dump_stats_path (where INC wrote the stats).",
            )
        if len(groups) > 1:
            raise MeasurementError(
                directory,
                f"mixes {len(groups)} runs: {_describe(groups)}",
                fix="move the files of the other run out of this directory.",
            )
        names = sorted(next(iter(groups.values())), key=lambda n: -1 if n.rank is None else n.rank)
        _check_complete(directory, names)
        return cls(directory=directory, names=names, meta=read_meta(directory))

    @classmethod
    def discover_all(cls, directory: str | Path) -> list[MeasurementSet]:
        """The range set (if any) first, then every scale set beside it; all must share one world size."""
        directory = Path(directory)
        methods = scale_methods(directory) if directory.is_dir() else []
        try:
            sets = [cls.discover(directory)]
        except MeasurementError:
            if not methods:
                raise
            sets = []
        sets += [cls.discover(directory, method=m) for m in methods]
        for other in sets[1:]:
            if other.world_size != sets[0].world_size:
                what = f"the {sets[0].method} scale files" if sets[0].method else "the measurements"
                raise MeasurementError(
                    directory,
                    f"{other.method} scale files have world size {other.world_size}, {what} {sets[0].world_size}",
                    fix="remove the stale scale files.",
                )
        return sets

    def read(self, rank_index: int, *, check_npz: bool = True, strict: bool = True) -> RankFile:
        return read_rank_file(self.directory, self.names[rank_index], check_npz=check_npz, strict=strict)

    def read_all(self, *, check_npz: bool = True, strict: bool = True) -> list[RankFile]:
        return [self.read(i, check_npz=check_npz, strict=strict) for i in range(len(self.names))]


def _describe(groups: dict[tuple, list[StatsName]]) -> str:
    parts = []
    for (prefix, _, world), names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        size = f"world size {world}" if world else "unranked"
        parts.append(f"'{prefix}' {size} ({len(names)} files, e.g. {names[0].stem}.json)")
    return "; ".join(parts)


def _check_complete(directory: Path, names: list[StatsName]) -> None:
    world_size = names[0].world_size
    if names[0].rank is None or world_size is None:  # unranked (a rank always comes with its world size)
        return
    have = {n.rank for n in names if n.rank is not None}
    missing = [r for r in range(world_size) if r not in have]
    extra = sorted(r for r in have if r >= world_size)
    if extra:
        raise MeasurementError(
            directory / names[0].with_rank(extra[0], world_size).stem,
            f"rank {extra[0]} is out of range for world size {world_size}",
            fix="the file was renamed by hand or belongs to another run: remove it.",
        )
    if missing:
        example = names[0].with_rank(missing[0], world_size).stem + JSON
        listed = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise MeasurementError(
            directory,
            f"rank(s) {listed} of {world_size} missing (e.g. {example})",
            fix="copy them from the node that ran those ranks, or re-run the measurement.",
        )


def scale_methods(directory: Path) -> list[str]:
    """The scale methods (e.g. MAXABS_HW) whose files sit in `directory`."""
    found = {parsed[0].method for p in directory.iterdir() if (parsed := parse_name(p)) and parsed[0].method}
    return sorted(found)
