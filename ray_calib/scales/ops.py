"""One range node -> one scale node, per INC op type (INC's `ops_quantizer.py`, one rule per class).

A(x) is the activation rule on max(x), W the weight scale, P(a, b) INC's output product:
    linear               inputs [A(in0)]  outputs (P(W, A(in0)),)  params {weight: W}
                         pcs weights: W per output channel, params {weight: {0: W, 1: ones(in_features)}}
    row_parallel_linear  inputs [A(in0)]  outputs (A(out0),): the measured pre-all-reduce max with the
                         output backoff; with allreduce quantization (A1(out0), A1(out1)), backoff 1.0
    matmul               inputs [A(in0), A(in1)]            outputs (P(in0, in1),)  (computed as a plain
                         product by MatmulOpQuantizer, also for the fixed-scale methods)
    b2b_matmul           inputs [A(in0), A(out0)] (input 1 holds garbage)  outputs (P(in0, in1),)
    kv_cache             inputs [A(in0)]  outputs [A(in0)] (a list: the input scale, never a measured one)
    fused_sdpa           inputs [A(q), A(k), A(v), A(out1)]  outputs (A(out0),)
    softmax              inputs ()        outputs (A(out0),)
    dynamic_moe          inputs [A(in_i) for each input] + [A(out[1+e]) for local expert e]  outputs (A(out0),)
    embedding            inputs ()        outputs ()  params {weight: W}
Every node has `params` (`{}` without weights). unit_scale / hw_aligned_single_scale put their fixed value
everywhere except matmul outputs (the product). Values are stored as float32, as INC saves them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray_calib.errors import MeasurementError
from ray_calib.inc import optypes
from ray_calib.inc.arith import f32
from ray_calib.inc.devices import DeviceScales
from ray_calib.inc.methods import ScaleMethod, activation_scale, leaf_max, product, scale_from_maxabs
from ray_calib.inc.target import IncTarget


@dataclass(frozen=True)
class WeightScale:
    """A weight node's scale as INC computes it from `mod.weight`: per tensor (a float, or a 1-element list
    for the opt methods, whose search returns a shape-[1] tensor) or per output channel (pcs)."""

    scale: float | list[float]
    in_features: int | None = None  # pcs: length of INC's input-channel ones


WeightSource = Callable[[str, dict], "WeightScale | None"]  # (module, range node) -> scale from real weights


@dataclass
class ScaleRules:
    method: ScaleMethod
    device: DeviceScales
    target: IncTarget = field(default_factory=IncTarget)
    weights: WeightSource | None = None
    from_weights: int = 0  # nodes whose weight scale came from checkpoint tensors

    def act(self, leaf: Any, *, backoff: float | None = None) -> float:
        return activation_scale(leaf, self.method, self.device, backoff=backoff)

    def scale_node(self, module: str, node: dict, op_type: str, local_experts: int) -> dict[str, Any]:
        inputs = node.get("inputs", [])
        outputs = node.get("outputs", [])
        act = [self.act(leaf) for leaf in inputs]
        if op_type in (optypes.LINEAR, optypes.ROW_PARALLEL_LINEAR, optypes.EMBEDDING):
            return self._weight_node(module, node, op_type, act)
        if op_type in (optypes.MATMUL, optypes.B2B_MATMUL):
            _need(module, inputs, 2, "inputs", "a matmul")
            act = act[:2]
            if op_type == optypes.B2B_MATMUL and self.target.b2b_op and outputs:
                act[1] = self.act(outputs[0])
            return _node(act, (product(act[0], act[1], self.device),))
        if op_type == optypes.KV_CACHE:
            _need(module, inputs, 1, "inputs", "a KV cache")
            return _node(act[:1], [act[0]])
        if op_type == optypes.FUSED_SDPA:
            _need(module, inputs, 3, "inputs", "fused SDPA (q, k, v)")
            _need(module, outputs, 2, "outputs", "fused SDPA (output, softmax max)")
            return _node(act[:3] + [self.act(outputs[1])], (self.act(outputs[0]),))
        if op_type == optypes.SOFTMAX:
            _need(module, outputs, 1, "outputs", "a softmax")
            return _node((), (self.act(outputs[0]),))
        if op_type == optypes.DYNAMIC_MOE:
            return self._moe_node(module, inputs, outputs, act, local_experts)
        return _node(act, tuple(self.act(leaf) for leaf in outputs))

    def _weight_node(self, module: str, node: dict, op_type: str, act: list[float]) -> dict[str, Any]:
        weight = self._weight(module, node)
        if op_type == optypes.EMBEDDING:
            return _node((), (), _weight_param(weight))
        _need(module, node.get("inputs", []), 1, "inputs", "a linear layer")
        outputs = node.get("outputs", [])
        if op_type == optypes.ROW_PARALLEL_LINEAR and self.target.row_parallel_op:
            if self.target.allreduce_quantization:
                out: tuple = (self.act(outputs[0], backoff=1.0), self.act(outputs[1], backoff=1.0))
            else:
                out = (self.act(outputs[0], backoff=self.method.output_backoff),)
        elif self.method.fixed:
            out = (self.act(0.0),)
        else:
            out = (product(weight.scale, act[0], self.device),)
        return _node(act[:1], out, _weight_param(weight))

    def _weight(self, module: str, node: dict) -> WeightScale:
        found = self.weights(module, node) if self.weights else None
        if found is not None:
            self.from_weights += 1
            return found
        rule = self.method.weight
        if rule.value == "opt" or rule.granularity == "pcs":
            raise MeasurementError(
                module,
                f"scale_method '{self.method.name}' computes weight scales from the weight "
                "tensor itself, not from its measured max",
                fix="pass --weights MODEL_DIR (the checkpoint that was measured).",
            )
        return WeightScale(scale_from_maxabs(leaf_max(node["params"]["weight"]), rule, self.device))

    def _moe_node(self, module: str, inputs: list, outputs: list, act: list[float], local_experts: int) -> dict:
        """INC >= 3.5 sizes the per-expert scales by local_num_experts; before, by num_experts (all measured)."""
        experts = local_experts if self.target.local_experts and local_experts else len(outputs) - 1
        _need(
            module,
            outputs,
            1 + experts,
            "outputs",
            f"a MoE op with {experts} local experts (output + one intermediate max per expert)",
        )
        return _node(act + [self.act(leaf) for leaf in outputs[1 : 1 + experts]], (self.act(outputs[0]),))


def _weight_param(weight: WeightScale) -> dict[str, Any]:
    if weight.in_features is None:
        return {"weight": _stored(weight.scale)}
    return {"weight": {0: _stored(weight.scale), 1: [1.0] * weight.in_features}}


def _node(inputs, outputs, params: dict | None = None) -> dict[str, Any]:
    """INC's ModuleConfig: inputs, outputs, params (always present), float32 values."""
    stored_inputs = [_stored(x) for x in inputs] if inputs else ()
    stored_outputs = type(outputs)(_stored(x) for x in outputs)
    return {"inputs": stored_inputs, "outputs": stored_outputs, "params": params or {}}


def _stored(value):
    return [f32(v) for v in value] if isinstance(value, list) else f32(value)


def _need(module: str, leaves: list, count: int, field_name: str, what: str) -> None:
    if len(leaves) < count:
        raise MeasurementError(
            module,
            f"has {len(leaves)} measured {field_name}; {what} needs {count} (INC indexes "
            f"{field_name}[{count - 1}] and would fail)",
            fix="re-measure with the INC/ray-calib version that patched this module.",
        )
