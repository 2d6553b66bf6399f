"""One rank's stats: the JSON + NPZ + `_mod_list.json` triple INC reads and writes.

JSON: `{"GlobalRank": null, "LocalRank": r, "Mode": "DynamicRange"|"Scale", "Nodes": {...}}`, each node
`{"inputs": [leaf, ...], "outputs": [leaf, ...]?, "params": {"weight": leaf}?}`. Leaves are kept in
memory exactly as JSON has them (nested lists of floats: `[[v]]` per tensor, `[[v0], [v1]]` per channel,
plain floats in scale files). INC's QUANTIZE reads only the NPZ, so every write rewrites the NPZ.
Scale files (Mode "Scale") are held in INC's own containers (`optypes.inc_scale_layout`: `outputs` a
tuple, per-channel weights `{0: ..., 1: ...}`), so our NPZ of them is INC's byte for byte; INC writes
no `_mod_list.json` beside them and neither do we. NPZ and JSON are compared by value, never by
container type. INC indents its JSON by 4 or not at all; readers don't care, so we write orjson's 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_calib import atomic
from ray_calib.errors import MeasurementError
from ray_calib.inc import jsonio, npz
from ray_calib.inc.naming import JSON, MOD_LIST, NPZ, StatsName
from ray_calib.inc.optypes import inc_scale_layout

MODE_RANGE = "DynamicRange"
MODE_SCALE = "Scale"
_HEADER_KEYS = ("GlobalRank", "LocalRank", "Mode", "Nodes")
_NODE_FIELDS = frozenset({"inputs", "outputs", "params"})

Node = dict[str, Any]


@dataclass
class RankFile:
    name: StatsName
    nodes: dict[str, Node]
    mode: str = MODE_RANGE
    mod_list: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. INC's "NumSamples", kept as-is

    @property
    def rank(self) -> int | None:
        return self.name.rank

    def to_stats(self) -> dict[str, Any]:
        # INC writes -1 for LocalRank of a non-distributed file; it never reads the field back.
        local_rank = -1 if self.name.rank is None else self.name.rank
        nodes = self.nodes
        if self.mode == MODE_SCALE:
            nodes = {module: inc_scale_layout(module, node) for module, node in nodes.items()}
        return {"GlobalRank": None, "LocalRank": local_rank, "Mode": self.mode, **self.extra, "Nodes": nodes}


def read_rank_file(directory: str | Path, name: StatsName, *, check_npz: bool = True, strict: bool = True) -> RankFile:
    """Read and validate one rank's triple; with `check_npz` the NPZ must hold what the JSON holds.

    `strict=False` lets NaN/inf values through (for `inspect`, which counts them).
    """
    json_path = name.file(directory, JSON)
    stats, non_finite = jsonio.load(json_path)
    stats = _validated(json_path, stats, name, check_finite=strict and non_finite)
    if stats["Mode"] == MODE_SCALE:
        stats["Nodes"] = {module: inc_scale_layout(module, node) for module, node in stats["Nodes"].items()}
    if check_npz:
        npz_path = name.file(directory, NPZ)
        if not npz_path.exists():
            raise MeasurementError(
                npz_path,
                "is missing (INC's QUANTIZE reads only the NPZ)",
                fix="re-copy it from the node that wrote it.",
            )
        if not npz.holds(npz_path, stats):  # byte-identical to numpy's pickle of the JSON: equal, no decode
            _check_same(json_path, stats, npz_path, npz.load(npz_path))
    mod_list_path = name.file(directory, MOD_LIST)
    mod_list = jsonio.load(mod_list_path)[0] if mod_list_path.exists() else list(stats["Nodes"])
    if not isinstance(mod_list, list) or not all(isinstance(m, str) for m in mod_list):
        raise MeasurementError(mod_list_path, "must be a JSON list of module names", fix="re-copy or regenerate it.")
    extra = {k: v for k, v in stats.items() if k not in _HEADER_KEYS}
    return RankFile(name=name, nodes=stats["Nodes"], mode=stats["Mode"], mod_list=mod_list, extra=extra)


def write_rank_file(rank_file: RankFile, directory: str | Path) -> list[Path]:
    """Write JSON, NPZ and (range files only, as INC) the mod_list, each atomically."""
    stats = rank_file.to_stats()
    name = rank_file.name
    written = [
        atomic.write_bytes(name.file(directory, JSON), jsonio.dumps(stats)),
        npz.save(name.file(directory, NPZ), stats),
    ]
    if rank_file.mode != MODE_SCALE:
        written.append(atomic.write_bytes(name.file(directory, MOD_LIST), jsonio.dumps(rank_file.mod_list)))
    return written


def _validated(path: Path, stats: Any, name: StatsName, *, check_finite: bool) -> dict[str, Any]:
    fix = "re-copy it from the node that wrote it or re-run the measurement."
    if not isinstance(stats, dict) or not isinstance(stats.get("Nodes"), dict):
        raise MeasurementError(path, "has no 'Nodes' object; not an INC stats file", fix=fix)
    if stats.get("Mode") not in (MODE_RANGE, MODE_SCALE):
        raise MeasurementError(path, f"has Mode {stats.get('Mode')!r}, expected 'DynamicRange' or 'Scale'", fix=fix)
    local_rank = stats.get("LocalRank")
    if name.rank is not None and local_rank not in (None, -1, name.rank):
        raise MeasurementError(
            path,
            f"says LocalRank {local_rank} but its name says rank {name.rank}",
            fix="a file was renamed by hand: restore its original name.",
        )
    for module, node in stats["Nodes"].items():
        if not isinstance(node, dict) or not set(node) <= _NODE_FIELDS:
            raise MeasurementError(path, f"node '{module}' is not an inputs/outputs/params object", fix=fix)
        bad = _first_non_finite(node) if check_finite else None
        if bad is not None:
            raise MeasurementError(
                path,
                f"node '{module}' holds {bad[1]} in its {bad[0]}",
                fix="the measurement overflowed or was corrupted: re-measure (check the model for inf activations).",
            )
    return stats


def node_values(node: Node):
    """Every number of a node: its input, output and param leaves flattened."""
    for _, leaf in _leaves(node):
        yield from _flat(leaf)


def _leaves(node: Node):
    for field_name in ("inputs", "outputs"):
        for index, leaf in enumerate(node.get(field_name, ())):
            yield f"{field_name}[{index}]", leaf
    for key, leaf in node.get("params", {}).items():
        yield f"params.{key}", leaf


def _flat(leaf: Any):
    if isinstance(leaf, dict):  # per-channel weight scales {0: ..., 1: ...}
        for item in leaf.values():
            yield from _flat(item)
    elif isinstance(leaf, (list, tuple)):
        for item in leaf:
            yield from _flat(item)
    else:
        yield leaf


def _first_non_finite(node: Node) -> tuple[str, Any] | None:
    """(where, value) of the first leaf value that is not a finite number, else None."""
    for where, leaf in _leaves(node):
        for value in _flat(leaf):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                return where, value
    return None


def _check_same(json_path: Path, stats: dict, npz_path: Path, npz_stats: Any) -> None:
    """The NPZ must hold the JSON's values (float32-rounded); lists vs tuples and "0" vs 0 keys don't matter."""
    if not isinstance(npz_stats, dict) or not isinstance(npz_stats.get("Nodes"), dict):
        raise MeasurementError(npz_path, "has no 'Nodes'; not an INC stats file", fix="regenerate it.")
    json_nodes, npz_nodes = stats["Nodes"], npz_stats["Nodes"]
    fix = (
        f"one of the pair is stale: INC's QUANTIZE reads only {npz_path.name}; re-copy both from the same run, "
        f"or delete {json_path.name} and rewrite it from the NPZ."
    )
    only = sorted(set(json_nodes) ^ set(npz_nodes))
    if only:
        side = json_path.name if only[0] in json_nodes else npz_path.name
        raise MeasurementError(
            npz_path,
            f"disagrees with {json_path.name}: node '{only[0]}' is only in {side} ({len(only)} such nodes)",
            fix=fix,
        )
    for module, node in json_nodes.items():
        where = _first_difference(node, npz_nodes[module])
        if where is not None:
            raise MeasurementError(npz_path, f"disagrees with {json_path.name} at node '{module}' {where}", fix=fix)


def same_values(a: Any, b: Any) -> bool:
    """Equal as INC reads them: sequences alike (list/tuple), dict keys as strings, floats within float32."""
    return _first_difference(a, b) is None


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        keys_a, keys_b = {str(k): k for k in a}, {str(k): k for k in b}
        if keys_a.keys() != keys_b.keys():
            return f"{where or 'node'}: keys {sorted(keys_a)} vs {sorted(keys_b)}"
        for key in keys_a:
            found = _first_difference(a[keys_a[key]], b[keys_b[key]], f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: {len(a)} vs {len(b)} entries"
        for index, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{where}[{index}]")
            if found:
                return found
        return None
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if (a != a and b != b) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-30):
            return None
        return f"{where}: {a!r} vs {b!r}"
    return None if a == b else f"{where}: {a!r} vs {b!r}"
