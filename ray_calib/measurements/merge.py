"""Max-merge of range files of the same ranks measured on different prompts (chunks of one run).

Maxabs is a max, so merging chunk results is exact: the merge of chunks equals one pass over all
prompts. A module that ran in only some chunks keeps the values of those; mod_lists are united in
order. Leaves are element-wise maxima (never Python's lexicographic max() on lists).
"""

from __future__ import annotations

from typing import Any

from ray_calib.errors import MeasurementError
from ray_calib.measurements.rankfile import Node, RankFile


def merge_chunks(first: RankFile, *others: RankFile) -> RankFile:
    """One rank's file over all chunks; every input must name the same rank and world size."""
    nodes: dict[str, Node] = {module: _copy(node) for module, node in first.nodes.items()}
    mod_list = dict.fromkeys(first.mod_list)
    for other in others:
        if (other.name.rank, other.name.world_size) != (first.name.rank, first.name.world_size):
            raise MeasurementError(other.name.stem, f"cannot merge rank {other.name.rank}/{other.name.world_size} "
                                   f"into rank {first.name.rank}/{first.name.world_size}",
                                   fix="merge chunks of one rank only.")
        for module, node in other.nodes.items():
            nodes[module] = _merge_node(nodes[module], node, module) if module in nodes else _copy(node)
        mod_list.update(dict.fromkeys(other.mod_list))
    return RankFile(name=first.name, nodes=nodes, mode=first.mode, mod_list=list(mod_list), extra=dict(first.extra))


def _merge_node(a: Node, b: Node, module: str) -> Node:
    if a.keys() != b.keys():
        raise MeasurementError(module, f"node fields differ between chunks ({sorted(a)} vs {sorted(b)})",
                               fix="the chunks come from different runs; delete the checkpoints and re-measure.")
    merged: Node = {}
    for field, value in a.items():
        if field == "params":
            merged[field] = {key: _max(value[key], b[field][key], module) for key in value}
        else:
            if len(value) != len(b[field]):
                raise MeasurementError(module, f"{field} count differs between chunks",
                                       fix="the chunks come from different runs; delete the checkpoints and re-measure.")
            merged[field] = [_max(x, y, module) for x, y in zip(value, b[field])]
    return merged


def _max(a: Any, b: Any, module: str) -> Any:
    if isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            raise MeasurementError(module, "leaf shapes differ between chunks", fix="re-measure.")
        return [_max(x, y, module) for x, y in zip(a, b)]
    return max(a, b)


def _copy(node: Node) -> Node:
    return {field: ({k: v for k, v in value.items()} if field == "params" else list(value))
            for field, value in node.items()}
