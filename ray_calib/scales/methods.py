"""INC's scale methods as data plus pure functions: maxabs -> scale, weight tensor -> scale (DESIGN §5).

A method is two `TensorRule`s, one for weights and one for activations (INC's ScaleMethodConfig):
    value        maxabs | fixed | opt (MSE search over candidate scales)
    granularity  pts (one scale per tensor) | pcs (one per output channel)
    rounding     identity | pow2 | hw (pow2, exponent up to a multiple of the device factor, clamped)
                 | hw_fixed (the device's first HW scale) | unit (1.0)
    backoff      scale = maxabs / (fullscale * backoff); 0.5 weights, 0.25 activations unless
                 QUANT_CONFIG's scale_params.weight_backoff / input_backoff say otherwise
Linear and matmul outputs take input scale x weight (or input0 x input1) scales.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ray_calib.errors import ConfigError
from ray_calib.scales.devices import DeviceScales

# Below this a maxabs is "nothing measured" (an expert no token reached): INC's PCS epsilon,
# used for every granularity so that no scale is 0 (a division by zero in the server).
MIN_SCALE = 1.1754943508222875e-38  # torch.finfo(torch.bfloat16).tiny


@dataclass(frozen=True)
class TensorRule:
    value: str = "maxabs"
    granularity: str = "pts"
    rounding: str = "identity"
    backoff: float = 1.0
    candidates: tuple[float, ...] = ()  # opt: absolute scales (pts) or factors on the maxabs scale (pcs)


@dataclass(frozen=True)
class ScaleMethod:
    name: str
    weight: TensorRule
    activation: TensorRule
    dynamic_only: bool = False  # activation scales are computed per token at run time
    hw_candidates: bool = False  # opt candidates are the device's HW scales

    @property
    def needs_hw_table(self) -> bool:
        return "hw" in (self.weight.rounding, self.activation.rounding) or self.hw_candidates

    @property
    def per_channel_weights(self) -> bool:
        return self.weight.granularity == "pcs"

    @property
    def file_tag(self) -> str:
        """The METHOD part of INC's scale file names, e.g. MAXABS_HW."""
        return self.name.upper()


_W, _A = 0.5, 0.25
_POW2_W = TensorRule(rounding="pow2", backoff=_W)
_POW2_A = TensorRule(rounding="pow2", backoff=_A)
_HW_W = TensorRule(rounding="hw", backoff=_W)
_HW_A = TensorRule(rounding="hw", backoff=_A)
_PCS_POW2_W = TensorRule(granularity="pcs", rounding="pow2", backoff=_W)
_PCS_OPT_W = TensorRule(value="opt", granularity="pcs", rounding="pow2", backoff=_W,
                        candidates=tuple(2.0 ** s for s in range(-3, 5)))

METHODS: dict[str, ScaleMethod] = {m.name: m for m in (
    ScaleMethod("unit_scale", TensorRule(value="fixed", rounding="unit"), TensorRule(value="fixed", rounding="unit")),
    ScaleMethod("hw_aligned_single_scale", TensorRule(value="fixed", rounding="hw_fixed"),
                TensorRule(value="fixed", rounding="hw_fixed")),
    ScaleMethod("maxabs_arbitrary", TensorRule(backoff=_W), TensorRule(backoff=_A)),
    ScaleMethod("maxabs_pow2", _POW2_W, _POW2_A),
    ScaleMethod("maxabs_hw", _HW_W, _HW_A),
    ScaleMethod("maxabs_hw_opt_weight", TensorRule(value="opt", rounding="hw", backoff=_W), _HW_A, hw_candidates=True),
    ScaleMethod("maxabs_pow2_opt_weight", TensorRule(value="opt", rounding="pow2", backoff=_W,
                                                     candidates=tuple(2.0 ** s for s in range(-10, 10))), _POW2_A),
    ScaleMethod("act_maxabs_hw_weights_pcs_maxabs_pow2", _PCS_POW2_W, _HW_A),
    ScaleMethod("act_maxabs_hw_weights_pcs_opt_pow2", _PCS_OPT_W, _HW_A),
    ScaleMethod("act_maxabs_pow2_weights_pcs_maxabs_pow2", _PCS_POW2_W, _POW2_A),
    ScaleMethod("act_maxabs_pow2_weights_pcs_opt_pow2", _PCS_OPT_W, _POW2_A),
    ScaleMethod("act_maxabs_pcs_pow2_weight_maxabs_pts_pow2_hw", _HW_W,
                TensorRule(granularity="pcs", rounding="pow2"), dynamic_only=True),
    ScaleMethod("maxabs_pcs_pow2", _PCS_POW2_W, TensorRule(granularity="pcs", rounding="pow2"), dynamic_only=True),
)}


def get_method(name: str, *, input_backoff: float | None = None, weight_backoff: float | None = None) -> ScaleMethod:
    """The method called `name` (any case), with scale_params backoffs applied."""
    method = METHODS.get(name.lower())
    if method is None:
        raise ConfigError(f"unknown scale_method '{name}'", fix=f"use one of {', '.join(METHODS)}.")
    for key, value in (("input_backoff", input_backoff), ("weight_backoff", weight_backoff)):
        if value is not None and not 0 < value <= 1:
            raise ConfigError(f"scale_params.{key} is {value}", fix="use a backoff in (0, 1], e.g. 0.25 or 0.5.")
    if input_backoff is not None:
        method = replace(method, activation=replace(method.activation, backoff=input_backoff))
    if weight_backoff is not None:
        method = replace(method, weight=replace(method.weight, backoff=weight_backoff))
    return method


def check_method_for_device(method: ScaleMethod, device: DeviceScales, *, dynamic: bool = False) -> None:
    if method.needs_hw_table and not device.has_hw_scales:
        raise ConfigError(f"scale_method '{method.name}' rounds to Gaudi HW scales, which {device.name} does not have",
                          fix="use maxabs_pow2 or maxabs_arbitrary (or their pcs variants) on cuda/cpu.")
    if method.dynamic_only and not dynamic:
        raise ConfigError(f"scale_method '{method.name}' works only with dynamic quantization (activation scales "
                          "per token at run time)", fix='set "dynamic_quantization": true or pick a static method '
                          "such as maxabs_hw / maxabs_pow2.")


# ---- rounding -----------------------------------------------------------------------------------------

def pow2_ceil(scale: float) -> float:
    return 2.0 ** math.ceil(math.log2(scale))


def round_scale(scale: float, rounding: str, device: DeviceScales) -> float:
    """INC's round_scales_function for one float scale."""
    if rounding == "identity":
        return scale
    if rounding == "unit":
        return 1.0
    if rounding == "hw_fixed":
        return device.hw_scales[0]
    exponent = math.ceil(math.log2(scale))
    if rounding == "pow2":
        return 2.0 ** exponent
    if rounding == "hw":
        factor = device.hw_factor
        exponent = math.ceil(exponent / factor) * factor
        return 2.0 ** min(max(exponent, device.min_exponent), device.max_exponent)
    raise ConfigError(f"unknown rounding '{rounding}'", fix="use identity, pow2, hw, hw_fixed or unit.")


def scale_from_maxabs(maxabs: float, rule: TensorRule, device: DeviceScales) -> float:
    """One scale from a measured or computed max-abs value (pts; pcs applies this per channel)."""
    if rule.value == "fixed":
        return round_scale(1.0, rule.rounding, device)
    raw = max(float(maxabs) / (device.fullscale * rule.backoff), MIN_SCALE)
    return round_scale(raw, rule.rounding, device)


def activation_scale(maxabs: float | Sequence, method: ScaleMethod, device: DeviceScales) -> float:
    """Static activation scale; a per-channel measurement is reduced to its max like INC does."""
    return scale_from_maxabs(leaf_max(maxabs), method.activation, device)


def leaf_max(leaf) -> float:
    """Max of a measurement leaf (`[[v]]`, `[[v0], [v1]]`, a plain float)."""
    if isinstance(leaf, (list, tuple)):
        return max((leaf_max(item) for item in leaf), default=0.0)
    return abs(float(leaf))


# ---- weights (torch) ------------------------------------------------------------------------------------

@dataclass
class WeightScaleSearch:
    """Streaming state for one fused group's weight scale: fed one tensor at a time, read once at the end.

    maxabs methods keep the running max; opt methods keep the summed squared FP8 round-trip error of
    every candidate scale, so a fused group (q/k/v, gate/up) gets one scale that is best for all members.
    """

    method: ScaleMethod
    device: DeviceScales
    maxabs: float = 0.0
    errors: list[float] = field(default_factory=list)

    def candidates(self) -> tuple[float, ...]:
        return self.device.hw_scales if self.method.hw_candidates else self.method.weight.candidates

    @property
    def needs_tensor(self) -> bool:
        """opt methods search over the weight itself; the others only need its max-abs (`add_maxabs`)."""
        return self.method.weight.value == "opt"

    def add_maxabs(self, maxabs: float) -> None:
        self.maxabs = max(self.maxabs, maxabs)

    def add(self, weight) -> None:
        self.add_maxabs(float(weight.abs().max().float()) if weight.numel() else 0.0)
        if self.needs_tensor:
            full = self.device.fullscale
            errors = [float(((weight.float() - fp8_round_trip(weight, s, full)) ** 2).sum()) for s in self.candidates()]
            self.errors = errors if not self.errors else [a + b for a, b in zip(self.errors, errors)]

    def scale(self) -> float:
        rule = self.method.weight
        if rule.value != "opt":
            return scale_from_maxabs(self.maxabs, rule, self.device)
        best = min(range(len(self.errors)), key=lambda i: (self.errors[i], -i))  # ties: INC keeps the later one
        return round_scale(self.candidates()[best], rule.rounding, self.device)


def fp8_round_trip(weight, scale, fullscale: float = 448.0):
    """weight -> FP8 with `scale` -> float32, what the server will compute with."""
    import torch

    scaled = (weight.float() / scale).clamp(-fullscale, fullscale)
    return scaled.to(torch.float8_e4m3fn).float() * scale


def channel_scales(weight, method: ScaleMethod, device: DeviceScales):
    """Per-output-channel weight scales (float32 [out_channels]) for the pcs methods."""
    import torch

    rule = method.weight
    maxabs = weight.abs().amax(dim=1).float()
    raw = torch.clamp(maxabs / (device.fullscale * rule.backoff), min=MIN_SCALE)
    scales = torch.exp2(torch.ceil(torch.log2(raw))) if rule.rounding == "pow2" else raw
    if rule.value != "opt":
        return scales
    best, best_err = scales.clone(), torch.full_like(scales, float("inf"))
    for factor in rule.candidates:
        trial = scales * factor
        err = ((weight.float() - fp8_round_trip(weight, trial[:, None], device.fullscale)) ** 2).sum(dim=1)
        better = err < best_err
        best, best_err = torch.where(better, trial, best), torch.where(better, err, best_err)
    return best
