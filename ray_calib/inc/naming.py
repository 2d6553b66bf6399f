"""INC's file names: `<prefix>_hooks_maxabs[_<METHOD>][_<rank>_<world>]{.json,.npz,_mod_list.json}`.

`prefix` is the basename of QUANT_CONFIG's `dump_stats_path`; `METHOD` (e.g. `MAXABS_HW`) marks a
scale file; `_<rank>_<world>` is absent for a non-distributed run. Ranks are matched exactly by parsing,
never by glob, so `_1_16` can never match `_11_16`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

_NAME_RE = re.compile(
    r"^(?P<prefix>.+?)_hooks_maxabs"
    r"(?:_(?P<method>[A-Z][A-Z0-9_]*?))?"
    r"(?:_(?P<rank>\d+)_(?P<world>\d+))?"
    r"(?P<suffix>_mod_list\.json|\.json|\.npz)$"
)

JSON, NPZ, MOD_LIST = ".json", ".npz", "_mod_list.json"
MEASURE_PREFIX = "inc_measure_output"  # the seeds' dump_stats_path basename


@dataclass(frozen=True, order=True)
class StatsName:
    """The identity of one rank's stats file triple (json, npz, mod_list)."""

    prefix: str
    method: str | None = None  # None for range (measurement) files
    rank: int | None = None  # global rank; None when the run was not distributed
    world_size: int | None = None

    @property
    def stem(self) -> str:
        parts = [f"{self.prefix}_hooks_maxabs"]
        if self.method:
            parts.append(self.method)
        if self.rank is not None:
            parts.append(f"{self.rank}_{self.world_size}")
        return "_".join(parts)

    @property
    def run_key(self) -> tuple[str, str | None, int | None]:
        """What the ranks of one run share: prefix, method and world size."""
        return (self.prefix, self.method, self.world_size)

    def file(self, directory: str | Path, kind: str) -> Path:
        return Path(directory) / f"{self.stem}{kind}"

    def with_rank(self, rank: int | None, world_size: int | None) -> StatsName:
        return replace(self, rank=rank, world_size=world_size)


def parse_name(path: str | Path) -> tuple[StatsName, str] | None:
    """Split a file name into (StatsName, kind) or return None if it is not an INC stats file."""
    match = _NAME_RE.match(Path(path).name)
    if not match:
        return None
    rank = match["rank"]
    name = StatsName(
        prefix=match["prefix"],
        method=match["method"],
        rank=None if rank is None else int(rank),
        world_size=None if rank is None else int(match["world"]),
    )
    return name, match["suffix"]
