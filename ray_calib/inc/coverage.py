"""`coverage.json`: how many tokens each routed expert saw during a measurement.

Experts that saw no tokens get no activation range (their scales would be guesses), so the file lists
them explicitly. Format: `{"schema": 1, "num_tokens": int, "experts": {moe_module: [count per global
expert]}, "never_hit": {moe_module: [expert, ...]}}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ray_calib import atomic
from ray_calib.errors import MeasurementError
from ray_calib.inc import jsonio
from ray_calib.inc.experts import expert_layout
from ray_calib.inc.rankfile import node_values

COVERAGE_FILE = "coverage.json"


@dataclass
class ExpertCoverage:
    experts: dict[str, list[int]] = field(default_factory=dict)  # MoE module -> token count per expert
    num_tokens: int = 0

    def never_hit(self) -> dict[str, list[int]]:
        return {
            module: [e for e, n in enumerate(counts) if n == 0]
            for module, counts in self.experts.items()
            if 0 in counts
        }

    def below(self, min_tokens: int) -> list[tuple[str, int, int]]:
        """(module, expert, tokens) for every expert that saw fewer than `min_tokens` tokens."""
        return [
            (module, e, n) for module, counts in self.experts.items() for e, n in enumerate(counts) if n < min_tokens
        ]

    def merge(self, other: ExpertCoverage) -> ExpertCoverage:
        """Counts add up (chunks of one run); a module missing on one side counts as zeros."""
        modules = list(dict.fromkeys([*self.experts, *other.experts]))
        merged = {}
        for module in modules:
            a, b = self.experts.get(module, []), other.experts.get(module, [])
            size = max(len(a), len(b))
            merged[module] = [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(size)]
        return ExpertCoverage(experts=merged, num_tokens=self.num_tokens + other.num_tokens)


def hits_from_ranges(rank_files: list, *, expert_parallel: bool) -> dict[str, list[int]]:
    """Per routed expert 1 if its range is non-zero on some rank, else 0 (for files without token counts).

    The fused MoE op's `outputs[1 + k]` is local expert k's range; with expert parallelism rank r holds
    the global experts r*E .. r*E+E-1, without it every rank holds all of them (a shard each).
    """
    hits: dict[str, list[int]] = {}
    for position, rank_file in enumerate(rank_files):
        layout = expert_layout(rank_file)
        rank = rank_file.rank if rank_file.rank is not None else position
        for op in layout.ops:
            outputs = (rank_file.nodes.get(op) or {}).get("outputs") or []
            size = layout.local_experts * (len(rank_files) if expert_parallel else 1)
            counts = hits.setdefault(op, [0] * size)
            for local, leaf in enumerate(outputs[1 : 1 + layout.local_experts]):
                expert = rank * layout.local_experts + local if expert_parallel else local
                if any(v != 0 for v in node_values({"outputs": [leaf]})):
                    counts[expert] = 1
    return hits


def write_coverage(directory: str | Path, coverage: ExpertCoverage) -> Path:
    data = {
        "schema": 1,
        "num_tokens": coverage.num_tokens,
        "experts": coverage.experts,
        "never_hit": coverage.never_hit(),
    }
    return atomic.write_bytes(Path(directory) / COVERAGE_FILE, jsonio.dumps(data))


def read_coverage(directory: str | Path) -> ExpertCoverage | None:
    path = Path(directory) / COVERAGE_FILE
    if not path.exists():
        return None
    data, _ = jsonio.load(path)
    if not isinstance(data, dict) or not isinstance(data.get("experts"), dict):
        raise MeasurementError(path, "has no 'experts' object", fix="delete it and re-run `ray-calib measure`.")
    return ExpertCoverage(experts=data["experts"], num_tokens=int(data.get("num_tokens", 0)))
