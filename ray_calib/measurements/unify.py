"""Re-shard per-rank stats from TP=N to TP=M, and expand a TP1 file for expert parallelism.

Target rank i takes the contiguous source group [i*g, ..., i*g+g-1], g = N/M; every leaf becomes the
element-wise max over the group. Under expert parallelism each rank holds different experts, so the
group's experts are concatenated instead: child `<op>.w13_list.K` of member j becomes `K + E*j`, and the
fused op's per-expert entries (`outputs[1:]` in range files, `inputs[1:]` in scale files) are joined in
group order while its first entry is max-reduced.

Scale files: every scale is monotone in its maxabs, so the max of the ranks' scales is the scale of the
merged range, except INC's output products (linear: input x weight, matmul: input0 x input1): the max
of products is not the product of maxima, so those outputs are rebuilt from the merged factors, in the
arithmetic the files show (exact, or rounded to bf16 as on Gaudi). Per-channel weight scales cannot be
merged (column-parallel shards hold different rows) and are refused.
"""

from __future__ import annotations

from ray_calib.errors import MeasurementError, UnifyError
from ray_calib.inc import optypes
from ray_calib.inc.arith import bf16
from ray_calib.inc.experts import ExpertLayout, expert_layout
from ray_calib.inc.rankfile import MODE_SCALE, Node, RankFile
from ray_calib.measurements.merge import check_fields, max_leaves, merge_nodes
from ray_calib.model.names import expert_child


def unify_ranks(
    rank_files: list[RankFile],
    to_world_size: int,
    *,
    expert_parallel: bool | None = None,
) -> list[RankFile]:
    """Merge N rank files into `to_world_size` ones. `expert_parallel=None` detects it from the files."""
    world_size = len(rank_files)
    check_sizes(world_size, to_world_size)
    check_same_nodes(rank_files)
    group = world_size // to_world_size
    return [
        merge_group(rank_files[i * group : (i + 1) * group], i, to_world_size, expert_parallel=expert_parallel)
        for i in range(to_world_size)
    ]


def merge_group(
    members: list[RankFile], target_rank: int, to_world_size: int, *, expert_parallel: bool | None = None
) -> RankFile:
    """Target rank `target_rank` from its contiguous source ranks `members` (same node sets)."""
    layout = expert_layout(members[0]) if expert_parallel is not False else None
    return _merge_group(members, target_rank, to_world_size, layout if layout and layout.has_experts else None)


def check_sizes(world_size: int, to_world_size: int) -> None:
    if to_world_size < 1 or to_world_size >= world_size:
        raise UnifyError(
            f"cannot unify {world_size} ranks to {to_world_size}: the target must be smaller (1 <= M < {world_size})",
            fix=f"use --to-tp with a divisor of {world_size} below it.",
        )
    if world_size % to_world_size:
        divisors = [m for m in range(1, world_size) if world_size % m == 0]
        raise UnifyError(
            f"cannot unify {world_size} ranks to {to_world_size}: {world_size} % {to_world_size} = "
            f"{world_size % to_world_size}",
            fix=f"use --to-tp {' | '.join(map(str, divisors))}.",
        )


def check_same_nodes(rank_files: list[RankFile]) -> None:
    reference = rank_files[0]
    names = reference.nodes.keys()
    for other in rank_files[1:]:
        if other.nodes.keys() != names:
            diff = sorted(names ^ other.nodes.keys())
            where = f"rank {reference.rank}" if diff[0] in names else f"rank {other.rank}"
            raise MeasurementError(
                other.name.stem + ".json",
                f"rank {other.rank} and rank {reference.rank} "
                f"measured different modules: '{diff[0]}' only on {where} ({len(diff)} differ)",
                fix="all ranks must come from one run with one QUANT_CONFIG; re-measure.",
            )


def _merge_group(
    members: list[RankFile], target_rank: int, to_world_size: int, layout: ExpertLayout | None
) -> RankFile:
    first = members[0]
    per_expert_field = "inputs" if first.mode == MODE_SCALE else "outputs"
    nodes: dict[str, Node] = {}
    for module in first.nodes:
        child = expert_child(module) if layout else None
        if child and layout:
            if child[0] not in layout.children or child[0] in nodes:
                continue  # emitted with its op (below), in group order
            nodes.update(_group_children(members, child[0], layout))  # the op itself was never called
        elif layout and module in layout.children:
            nodes[module] = _merge_fused_op(
                [m.nodes[module] for m in members], module, first.name.stem, per_expert_field
            )
            nodes.update(_group_children(members, module, layout))
        else:
            sources = [m.nodes[module] for m in members]
            if first.mode == MODE_SCALE:
                _check_mergeable_scales(sources[0], module, first.name.stem)
            nodes[module] = merge_nodes(sources, module, first.name.stem + ".json", "ranks")
            if first.mode == MODE_SCALE:
                _rebuild_product(module, sources, nodes[module])
    return RankFile(
        name=first.name.with_rank(target_rank, to_world_size),
        nodes=nodes,
        mode=first.mode,
        mod_list=_merge_mod_lists(members, layout),
        extra=dict(first.extra),
    )


def _check_mergeable_scales(node: Node, module: str, stem: str) -> None:
    if any(isinstance(leaf, dict) for leaf in node.get("params", {}).values()):
        raise UnifyError(
            f"{stem}: node '{module}' has per-channel weight scales, which cannot be re-sharded "
            "(a column-parallel rank holds only its own rows)",
            fix="unify the range files without these scale files, then run `ray-calib scales` on them.",
        )


_PRODUCTS = (lambda a, b: a * b, lambda a, b: bf16(a * b))  # float, and Gaudi's bf16 tensor product


def _factors(module: str, node: Node) -> tuple[float, float] | None:
    """The two scales INC multiplies into this node's output, if its op type has a product output."""
    kind = optypes.op_type(module, node)
    inputs, params = node.get("inputs", ()), node.get("params", {})
    if kind == optypes.LINEAR and len(inputs) == 1 and not isinstance(params["weight"], (list, dict)):
        return inputs[0], params["weight"]
    if kind in (optypes.MATMUL, optypes.B2B_MATMUL) and len(inputs) == 2:
        return inputs[0], inputs[1]
    return None


def _rebuild_product(module: str, sources: list[Node], merged: Node) -> None:
    """outputs[0] = factor0 x factor1 of the merged node when every rank's output is that product."""
    factors = [pair for pair in (_factors(module, node) for node in sources) if pair is not None]
    if (
        len(merged.get("outputs", ())) != 1
        or len(factors) != len(sources)
        or not all(isinstance(x, float) for pair in factors for x in pair)
    ):
        return
    for multiply in _PRODUCTS:
        if all(node["outputs"][0] == multiply(a, b) for node, (a, b) in zip(sources, factors)):
            merged_factors = _factors(module, merged)
            assert merged_factors is not None, "merged like its sources"
            merged["outputs"] = [multiply(*merged_factors)]
            return


def _group_children(members: list[RankFile], op: str, layout: ExpertLayout):
    """Member j's expert K becomes expert K + E*j; yields (new name, node) by kind, then new index."""
    kinds = sorted({kind for kind, _ in layout.children[op]})
    for kind in kinds:
        for j, member in enumerate(members):
            for child_kind, expert in layout.children[op]:
                if child_kind == kind:
                    yield (f"{op}.{kind}.{expert + layout.local_experts * j}", member.nodes[f"{op}.{kind}.{expert}"])


def _merge_fused_op(nodes: list[Node], module: str, stem: str, per_expert_field: str) -> Node:
    """First entry of `per_expert_field` max-reduced, the per-expert rest concatenated in group order."""
    check_fields(nodes, module, stem + ".json", "ranks")
    merged = merge_nodes(
        [{k: v for k, v in n.items() if k != per_expert_field} for n in nodes], module, stem + ".json", "ranks"
    )
    if per_expert_field in nodes[0]:
        head = max_leaves([n[per_expert_field][0] for n in nodes], module, "ranks")
        merged[per_expert_field] = [head] + [leaf for n in nodes for leaf in n[per_expert_field][1:]]
    return {field: merged[field] for field in nodes[0]}  # keep INC's field order


def _merge_mod_lists(members: list[RankFile], layout: ExpertLayout | None) -> list[str]:
    merged: dict[str, None] = {}
    for j, member in enumerate(members):
        for module in member.mod_list:
            child = expert_child(module) if layout and j else None
            if child and layout:
                module = f"{child[0]}.{child[1]}.{child[2] + layout.local_experts * j}"
            merged[module] = None
    return list(merged)


def expand_rank(rank_file: RankFile, to_world_size: int) -> list[RankFile]:
    """Split a TP1 file into `to_world_size` rank files, for expert-parallel serving.

    What the hand-run Gaudi flow's expand script does (docs/design.md §4).

    Rank j keeps every non-expert node, the fused op's first entry and its slice of the per-expert
    entries, and the expert children of its slice renumbered from 0, so `unify(expand(x))` gives `x` back.
    A dense model has nothing to split: every rank gets every node, the TP1 ranges (which cover each
    rank's shard, so the scales made from them are valid, if not tighter, at TP=W).
    """
    if to_world_size < 2:
        raise UnifyError(f"cannot expand to {to_world_size} rank(s)", fix="use --to-ranks 2 or more.")
    if rank_file.mode == MODE_SCALE:  # a TP1 per-channel vector has every output channel, a rank's shard fewer
        for module, node in rank_file.nodes.items():
            _check_mergeable_scales(node, module, rank_file.name.stem)
    layout = expert_layout(rank_file)
    if not layout.has_experts:
        return [
            RankFile(
                name=rank_file.name.with_rank(j, to_world_size),
                nodes=dict(rank_file.nodes),
                mode=rank_file.mode,
                mod_list=list(rank_file.mod_list),
                extra=dict(rank_file.extra),
            )
            for j in range(to_world_size)
        ]
    total = layout.local_experts
    if total % to_world_size:
        raise UnifyError(
            f"cannot split {total} experts over {to_world_size} ranks",
            fix=f"use --to-ranks with a divisor of {total} (at least 2).",
        )
    per_rank = total // to_world_size
    per_expert_field = "inputs" if rank_file.mode == MODE_SCALE else "outputs"
    return [_expand_one(rank_file, layout, j, per_rank, to_world_size, per_expert_field) for j in range(to_world_size)]


def _expand_one(
    rank_file: RankFile, layout: ExpertLayout, j: int, per_rank: int, to_world_size: int, per_expert_field: str
) -> RankFile:
    low, high = j * per_rank, (j + 1) * per_rank

    def local(module: str) -> str | None:
        child = expert_child(module)
        if not child:
            return module
        op, kind, expert = child
        return f"{op}.{kind}.{expert - low}" if low <= expert < high else None

    nodes: dict[str, Node] = {}
    for module, node in rank_file.nodes.items():
        new_name = local(module)
        if new_name is None:
            continue
        if module in layout.children and per_expert_field in node:
            entries = node[per_expert_field]
            node = {**node, per_expert_field: [entries[0], *entries[1 + low : 1 + high]]}
        nodes[new_name] = node
    mod_list = [name for name in map(local, rank_file.mod_list) if name is not None]
    return RankFile(
        name=rank_file.name.with_rank(j, to_world_size),
        nodes=nodes,
        mode=rank_file.mode,
        mod_list=mod_list,
        extra=dict(rank_file.extra),
    )
