"""Max-merge of range files of the same ranks measured on different prompts (chunks of one run).

Maxabs is a max, so merging chunk results is exact: the merge of chunks equals one pass over all
prompts. A module that ran in only some chunks keeps the values of those; mod_lists are united in
order. Leaves are element-wise maxima (never Python's lexicographic max() on lists).
"""

from __future__ import annotations

from typing import Any

from ray_calib.errors import MeasurementError
from ray_calib.inc.rankfile import Node, RankFile


def merge_chunks(first: RankFile, *others: RankFile) -> RankFile:
    """One rank's file over all chunks; every input must name the same rank and world size."""
    nodes: dict[str, Node] = {module: _copy(node) for module, node in first.nodes.items()}
    mod_list = dict.fromkeys(first.mod_list)
    for other in others:
        if (other.name.rank, other.name.world_size) != (first.name.rank, first.name.world_size):
            raise MeasurementError(
                other.name.stem,
                f"cannot merge rank {other.name.rank}/{other.name.world_size} "
                f"into rank {first.name.rank}/{first.name.world_size}",
                fix="merge chunks of one rank only.",
            )
        for module, node in other.nodes.items():
            nodes[module] = (
                merge_nodes([nodes[module], node], module, module, "chunks") if module in nodes else _copy(node)
            )
        mod_list.update(dict.fromkeys(other.mod_list))
    return RankFile(name=first.name, nodes=nodes, mode=first.mode, mod_list=list(mod_list), extra=dict(first.extra))


def merge_nodes(nodes: list[Node], module: str, source: str, across: str) -> Node:
    """Element-wise max of one module's node over ranks or chunks (`across` names which, for errors)."""
    check_fields(nodes, module, source, across)
    merged: Node = {}
    for field, value in nodes[0].items():
        if field == "params":
            merged[field] = {key: max_leaves([n[field][key] for n in nodes], module, across) for key in value}
        else:
            merged[field] = [max_leaves([n[field][i] for n in nodes], module, across) for i in range(len(value))]
    return merged


def check_fields(nodes: list[Node], module: str, source: str, across: str) -> None:
    """The same fields, the same number of entries in each and the same params on every rank or chunk."""
    first, fix = nodes[0], f"the {across} come from different runs; re-measure."
    for node in nodes[1:]:
        if node.keys() != first.keys():
            raise MeasurementError(
                source, f"node '{module}' fields differ between {across} ({sorted(first)} vs {sorted(node)})", fix=fix
            )
        for field, value in first.items():
            if len(node[field]) != len(value) or (field == "params" and node[field].keys() != value.keys()):
                raise MeasurementError(source, f"node '{module}': {field} count differs between {across}", fix=fix)


def max_leaves(leaves: list[Any], module: str, across: str) -> Any:
    """Element-wise max of equally shaped nested lists (Python's max() on lists would be lexicographic)."""
    first = leaves[0]
    if not isinstance(first, list):
        return max(leaves)
    try:  # per-tensor [[v]] on every side: the hot path
        return [[max([x for ((x,),) in leaves])]]
    except (ValueError, TypeError):
        pass
    if any(not isinstance(leaf, list) or len(leaf) != len(first) for leaf in leaves):
        raise MeasurementError(
            module, f"leaf shapes differ between {across}", fix="they come from different runs or models; re-measure."
        )
    return [max_leaves([leaf[i] for leaf in leaves], module, across) for i in range(len(first))]


def _copy(node: Node) -> Node:
    return {
        field: ({k: v for k, v in value.items()} if field == "params" else list(value)) for field, value in node.items()
    }
