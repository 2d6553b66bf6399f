"""Which checkpoint weights a measurement covers, in which fused groups, with which input ranges.

One rule for two stages: `measure` checks a fresh measurement against the model with it, and
`quantize` builds its FP8 plan from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray_calib.inc.methods import leaf_max
from ray_calib.model import names
from ray_calib.model.names import expert_child
from ray_calib.model.safetensors_io import TensorInfo


@dataclass
class QuantGroup:
    """Checkpoint weights that vLLM runs as one layer: one input range, one weight scale per tensor."""

    module: str  # vLLM module name (or expert child) the ranges come from
    members: list[str]  # checkpoint tensor names (`....weight`)
    input_maxabs: float


@dataclass
class MeasurementMatch:
    """How the nodes of a measurement cover the weights quantize converts (the rule `measure` checks too)."""

    groups: list[QuantGroup]
    missing: list[str]  # measured modules (with a weight range) whose weights the checkpoint lacks
    unmeasured: list[str]  # checkpoint weights quantize converts that no measured module covers

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unmeasured


def match_measurement(tensors: dict[str, TensorInfo], nodes: dict) -> MeasurementMatch:
    """Fused groups for every measured module with a weight range; what is left over on either side.

    A module counts as measured when its node exists with `params.weight` (observers write a node only
    for modules that ran). Routed experts that got no token keep an input range of 0 here; `build_plan`
    fills them from their layer, so they are not missing.
    """
    groups: list[QuantGroup] = []
    missing: list[str] = []
    moe_ops = _MoeRanges(nodes)
    for module, node in nodes.items():
        if "weight" not in node.get("params", {}):
            continue
        members = [f"{prefix}.weight" for prefix in names.checkpoint_modules(module)]
        if all(names.keeps_bf16(m) for m in members):  # e.g. a measured router gate: stays BF16
            continue
        if any(m not in tensors for m in members):
            missing.append(module)
            continue
        groups.append(QuantGroup(module, members, _input_maxabs(module, node, moe_ops)))
    covered = {member for group in groups for member in group.members}
    unmeasured = [t for t, info in tensors.items() if names.is_linear_weight(t, len(info.shape)) and t not in covered]
    return MeasurementMatch(groups, missing, unmeasured)


class _MoeRanges:
    """Input range and per-expert intermediate ranges of each fused MoE op, reduced once per op
    (a DeepSeek-R1 measurement has ~15k expert children reading 58 ops)."""

    def __init__(self, nodes: dict) -> None:
        self._nodes = nodes
        self._ops: dict[str, tuple[float, list[float]]] = {}

    def get(self, op: str) -> tuple[float, list[float]]:
        if op not in self._ops:
            node = self._nodes.get(op, {})
            per_expert = [leaf_max(leaf) for leaf in node.get("outputs", [])[1:]]  # INC: each expert's intermediate
            self._ops[op] = (leaf_max(node.get("inputs", [])[:1]), per_expert)
        return self._ops[op]


def _input_maxabs(module: str, node: dict, moe_ops: _MoeRanges) -> float:
    """The layer's input range; expert children take theirs from the fused MoE op when they have none."""
    own = leaf_max(node.get("inputs", [])[:1])
    child = expert_child(module)
    if child is None:
        return own
    op, kind, expert = child
    op_input, per_expert = moe_ops.get(op)
    if kind == "w13_list":  # every expert reads the MoE input
        return max(own, op_input)
    return max(own, per_expert[expert] if expert < len(per_expert) else 0.0)
