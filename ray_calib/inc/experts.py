"""Which fused MoE ops a rank file holds, and how many routed experts each rank has."""

from __future__ import annotations

from dataclasses import dataclass

from ray_calib.errors import MeasurementError
from ray_calib.inc.rankfile import RankFile
from ray_calib.model.names import expert_child


@dataclass(frozen=True)
class ExpertLayout:
    """Fused MoE ops and how many experts each rank holds (0 when the model has none)."""

    children: dict[str, list[tuple[str, int]]]  # op -> its (kind, expert) children, sorted
    local_experts: int

    @property
    def ops(self) -> frozenset[str]:
        return frozenset(self.children)

    @property
    def has_experts(self) -> bool:
        return self.local_experts > 0


def expert_layout(rank_file: RankFile) -> ExpertLayout:
    """Find fused MoE ops by their `<op>.w13_list.K` children; all ops must hold the same expert count."""
    children: dict[str, list[tuple[str, int]]] = {}
    for module in rank_file.nodes:
        child = expert_child(module)
        if child:
            children.setdefault(child[0], []).append(child[1:])
    counts = {len({expert for _, expert in kids}) for kids in children.values()}
    if len(counts) > 1:
        raise MeasurementError(
            rank_file.name.stem,
            f"MoE ops hold different expert counts {sorted(counts)}",
            fix="the file mixes runs; re-measure.",
        )
    return ExpertLayout(
        children={op: sorted(kids) for op, kids in children.items()}, local_experts=counts.pop() if counts else 0
    )
