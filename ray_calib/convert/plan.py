"""Which checkpoint tensors become FP8, in which fused groups, with which activation ranges.

Built from the model's tensor table and one TP1 measurement file, before any byte is written, so a
mismatch between the two fails in a second with both sides listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ray_calib.errors import ModelError
from ray_calib.inc import MeasurementSet
from ray_calib.inc.meta import RunMeta
from ray_calib.inc.methods import leaf_max
from ray_calib.inc.rankfile import RankFile
from ray_calib.measurements import unify_ranks
from ray_calib.measurements.match import QuantGroup, match_measurement
from ray_calib.model import names
from ray_calib.model.checkpoint import Checkpoint
from ray_calib.model.names import expert_child

_SHOWN = 4


@dataclass
class QuantPlan:
    groups: list[QuantGroup]
    group_of: dict[str, int]  # member tensor -> index into groups
    kv_maxabs: dict[str, tuple[float, float]] = field(default_factory=dict)  # layer -> (k, v)
    filled_experts: list[str] = field(default_factory=list)  # experts without tokens, given the layer max

    def is_quantized(self, tensor: str) -> bool:
        return tensor in self.group_of


def build_plan(
    checkpoint: Checkpoint, measurement: RankFile, *, fp8_kv: bool, one_expert_input_scale: bool = True
) -> QuantPlan:
    """`one_expert_input_scale`: vLLM's checkpoint (see `_share_expert_input_ranges`); False keeps each
    expert's own range (vllm-gaudi keeps down-projection input scales per expert)."""
    nodes = measurement.nodes
    match = match_measurement(checkpoint.tensors, nodes)
    if not match.complete:
        raise ModelError(
            _mismatch(match.missing, match.unmeasured, measurement),
            fix="quantize the model that was "
            "measured (same --model as `ray-calib measure`), or point --measurements at that model's run.",
        )
    groups = match.groups
    plan = QuantPlan(groups, {member: i for i, g in enumerate(groups) for member in g.members})
    plan.filled_experts = _expert_input_ranges(groups, shared=one_expert_input_scale)
    if fp8_kv:
        plan.kv_maxabs = kv_ranges(nodes)
        if not plan.kv_maxabs:
            raise ModelError(
                f"{measurement.name.stem}.json: no KV-cache ranges (attention nodes) for --fp8-kv",
                fix="measure with `ray-calib measure --fp8-kv`, or quantize without --fp8-kv.",
            )
    return plan


def _expert_input_ranges(groups: list[QuantGroup], *, shared: bool) -> list[str]:
    """Experts no calibration token reached get their layer's largest input range (per projection), and with
    `shared` every expert does.

    vLLM keeps one static input scale per MoE layer and projection, the max of the per-expert ones over a
    rank's experts (all of them at TP, the CPU/CUDA route's serving mode), so per-expert values would be
    collapsed at load anyway: writing that max is what the engine runs, and lets the scale audit tell a
    collapsed scale of another writer from ours. Returns the experts that had no range of their own."""
    by_op: dict[tuple[str, str], list[QuantGroup]] = {}
    for group in groups:
        child = expert_child(group.module)
        if child:
            by_op.setdefault((child[0], child[1]), []).append(group)
    idle = []
    for members in by_op.values():
        layer_max = max(g.input_maxabs for g in members)
        for group in members:
            if group.input_maxabs == 0.0 and layer_max > 0.0:
                idle.append(group.module)
            if group.input_maxabs == 0.0 or shared:
                group.input_maxabs = layer_max
    return idle


def kv_ranges(nodes: dict) -> dict[str, tuple[float, float]]:
    """(k maxabs, v maxabs) per attention layer from whichever KV nodes the measurement has."""
    ranges: dict[str, list[float]] = {}
    for module, node in nodes.items():
        kv = names.kv_node(module)
        if kv is None:
            continue
        inputs = node.get("inputs", [])
        k, v = ranges.setdefault(kv.layer, [0.0, 0.0])
        if kv.role == "kv" and len(inputs) >= 3:  # Attention(q, k, v) or MLAAttention(q, kv_c, k_pe)
            k, v = max(k, leaf_max(inputs[1])), max(v, leaf_max(inputs[2]))
            if "mla" in module:  # one latent cache holds [kv_c | k_pe]: one range for both
                k = v = max(k, v)
        elif kv.role in ("k", "latent") and inputs:
            k = max(k, leaf_max(inputs[0]))
            v = k if kv.role == "latent" else v
        elif kv.role == "v" and inputs:
            v = max(v, leaf_max(inputs[0]))
        ranges[kv.layer] = [k, v]
    return {layer: (k, v) for layer, (k, v) in ranges.items() if k > 0 or v > 0}


def _mismatch(missing: list[str], unmeasured: list[str], measurement: RankFile) -> str:
    parts = []
    if missing:
        parts.append(
            f"{len(missing)} measured module(s) have no weights in the model (first: {', '.join(missing[:_SHOWN])})"
        )
    if unmeasured:
        parts.append(f"{len(unmeasured)} model weight(s) have no measurement (first: {', '.join(unmeasured[:_SHOWN])})")
    return f"measurements {measurement.name.stem} do not match the model: " + "; ".join(parts)


def load_measurement(directory: str | Path) -> tuple[RankFile, RunMeta | None]:
    """The run in `directory` merged to one TP1 file (ranks' element-wise max), and its meta sidecar.

    Experts are concatenated only under expert parallelism: the sidecar's ep_size says so for our
    runs; plain INC output without a sidecar is left to unify's detection.
    """
    measurements = MeasurementSet.discover(directory)
    files = measurements.read_all()
    if len(files) == 1:
        return files[0], measurements.meta
    meta = measurements.meta
    expert_parallel = None if meta is None or meta.ep_size is None else meta.ep_size > 1
    return unify_ranks(files, 1, expert_parallel=expert_parallel)[0], meta
