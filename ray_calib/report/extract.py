"""Per-layer figures out of one TP1 measurement: KV cache, activation and weight ranges.

Pure functions over `RankFile`s (already unified to one rank). A node belongs to layer L when its
name holds `.layers.L.`; nodes outside the layer stack (embeddings, lm_head) are left out.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ray_calib.inc import RankFile
from ray_calib.model.names import expert_child

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# (kind, node-name suffix): INC's names, which ray-calib's own observers reuse (docs/design.md §3)
KV_KINDS: tuple[tuple[str, str], ...] = (("K", ".k_cache"), ("V", ".v_cache"), ("latent", ".latent_cache_k"))


@dataclass
class LayerRanges:
    """Per layer L: the max (and the smallest of the per-module maxima) of a class of tensors."""

    high: dict[int, float] = field(default_factory=dict)
    low: dict[int, float] = field(default_factory=dict)
    top_module: dict[int, str] = field(default_factory=dict)

    def add(self, layer: int, module: str, value: float) -> None:
        if value > self.high.get(layer, -math.inf):
            self.high[layer], self.top_module[layer] = value, module
        self.low[layer] = min(self.low.get(layer, math.inf), value)


@dataclass
class RunFigures:
    kv: dict[str, dict[int, float]]  # kind ("K", "V", "latent") -> layer -> maxabs
    activations: LayerRanges
    weights: LayerRanges
    num_nodes: int
    non_finite: list[str]  # nodes holding NaN/inf (their values are left out of the figures)


def layer_of(module: str) -> int | None:
    match = _LAYER.search(module)
    return int(match[1]) if match else None


def leaf_max(leaf) -> float | None:
    """Max |v| over a leaf (`[[v]]`, per-channel lists, plain floats); None if any value is NaN/inf."""
    if isinstance(leaf, (list, tuple)):
        values = [leaf_max(item) for item in leaf]
        finite = [v for v in values if v is not None]
        if len(finite) != len(values):
            return None
        return max(finite, default=0.0)
    value = abs(float(leaf))
    return value if math.isfinite(value) else None


def figures(rank_file: RankFile) -> RunFigures:
    kv: dict[str, dict[int, float]] = {}
    activations, weights = LayerRanges(), LayerRanges()
    non_finite = []
    for module, node in rank_file.nodes.items():
        layer = layer_of(module)
        if layer is None:
            continue
        found = [leaf_max(leaf) for leaf in node.get("inputs", [])]
        inputs = [v for v in found if v is not None]
        weight = node.get("params", {}).get("weight")
        weight_max = leaf_max(weight) if weight is not None else 0.0
        if len(inputs) != len(found) or weight_max is None:
            non_finite.append(module)
            continue
        kind = next((k for k, suffix in KV_KINDS if module.endswith(suffix)), None)
        if kind and inputs:
            kv.setdefault(kind, {})[layer] = max(kv.get(kind, {}).get(layer, 0.0), inputs[0])
        if weight is not None:
            weights.add(layer, module, weight_max)
            if inputs and not (expert_child(module) and inputs[0] == 0.0):  # INC's dummy expert input
                activations.add(layer, module, max(inputs))
    return RunFigures(
        kv=kv, activations=activations, weights=weights, num_nodes=len(rank_file.nodes), non_finite=non_finite
    )
