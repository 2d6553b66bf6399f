"""INC's scale methods as data plus pure functions: maxabs -> scale, weight tensor -> scale.

A method is two `TensorRule`s, one for weights and one for activations (INC's ScaleMethodConfig):
    value        maxabs | fixed | opt (MSE search over candidate scales)
    granularity  pts (one scale per tensor) | pcs (one per output channel)
    rounding     identity | pow2 | hw (pow2, exponent up to a multiple of the device factor, clamped)
                 | hw_fixed (the device's first HW scale) | unit (1.0)
    backoff      scale = maxabs / (fullscale * backoff); 0.5 weights, 0.25 activations. INC <= 3.4 takes
                 other values from QUANT_CONFIG's scale_params (input_backoff, weight_backoff, and
                 output_backoff for row-parallel outputs); INC >= 3.5 ignores scale_params and takes them
                 only from a dict-form scale_method ({"activation": {"backoff": ...}, ...}).
Linear and matmul outputs take input scale x weight (or input0 x input1) scales.

On Gaudi the arithmetic is INC's bf16 HPU arithmetic (`inc.arith.GaudiMath`), zero included: a
measured maxabs of 0 gives scale 0 for pow2/arbitrary and the lowest HW scale for hw, exactly as INC.
On CPU/CUDA (ray-calib's own FP8 checkpoint, which INC never reads) the math is float64 and a zero
maxabs is lifted to `MIN_SCALE`, because a zero scale would divide by zero in the server.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ray_calib.errors import ConfigError
from ray_calib.inc.arith import BF16_TINY, bf16, hw_exponent, pow2
from ray_calib.inc.devices import DeviceScales

# CPU/CUDA only: below this a maxabs is "nothing measured" (an expert no token reached). INC applies the
# same epsilon only to per-channel weight scales (MaxAbsPcs); its per-tensor scales can be 0.
MIN_SCALE = BF16_TINY


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
    output_backoff: float | None = None  # INC 3.4 scale_params.output_backoff (row-parallel outputs)

    @property
    def needs_hw_table(self) -> bool:
        return "hw" in (self.weight.rounding, self.activation.rounding) or self.hw_candidates

    @property
    def per_channel_weights(self) -> bool:
        return self.weight.granularity == "pcs"

    @property
    def fixed(self) -> bool:
        """unit_scale / hw_aligned_single_scale: every entry is one fixed value (INC writes no file for them)."""
        return self.weight.value == "fixed" and self.activation.value == "fixed"

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
_PCS_OPT_W = TensorRule(
    value="opt", granularity="pcs", rounding="pow2", backoff=_W, candidates=tuple(2.0**s for s in range(-3, 5))
)

METHODS: dict[str, ScaleMethod] = {
    m.name: m
    for m in (
        ScaleMethod(
            "unit_scale", TensorRule(value="fixed", rounding="unit"), TensorRule(value="fixed", rounding="unit")
        ),
        ScaleMethod(
            "hw_aligned_single_scale",
            TensorRule(value="fixed", rounding="hw_fixed"),
            TensorRule(value="fixed", rounding="hw_fixed"),
        ),
        ScaleMethod("maxabs_arbitrary", TensorRule(backoff=_W), TensorRule(backoff=_A)),
        ScaleMethod("maxabs_pow2", _POW2_W, _POW2_A),
        ScaleMethod("maxabs_hw", _HW_W, _HW_A),
        ScaleMethod(
            "maxabs_hw_opt_weight", TensorRule(value="opt", rounding="hw", backoff=_W), _HW_A, hw_candidates=True
        ),
        ScaleMethod(
            "maxabs_pow2_opt_weight",
            TensorRule(value="opt", rounding="pow2", backoff=_W, candidates=tuple(2.0**s for s in range(-10, 10))),
            _POW2_A,
        ),
        ScaleMethod("act_maxabs_hw_weights_pcs_maxabs_pow2", _PCS_POW2_W, _HW_A),
        ScaleMethod("act_maxabs_hw_weights_pcs_opt_pow2", _PCS_OPT_W, _HW_A),
        ScaleMethod("act_maxabs_pow2_weights_pcs_maxabs_pow2", _PCS_POW2_W, _POW2_A),
        ScaleMethod("act_maxabs_pow2_weights_pcs_opt_pow2", _PCS_OPT_W, _POW2_A),
        ScaleMethod(
            "act_maxabs_pcs_pow2_weight_maxabs_pts_pow2_hw",
            _HW_W,
            TensorRule(granularity="pcs", rounding="pow2"),
            dynamic_only=True,
        ),
        ScaleMethod("maxabs_pcs_pow2", _PCS_POW2_W, TensorRule(granularity="pcs", rounding="pow2"), dynamic_only=True),
    )
}


_INC_VALUE = {"maxabs": "maxabs", "fixed": "fixed_value", "opt": "opt"}
_INC_ROUNDING = {
    "identity": "identity",
    "pow2": "pow2",
    "hw": "hw_aligned",
    "hw_fixed": "hw_aligned_fixed",
    "unit": "scale_unit",
}


def inc_scale_method(method: ScaleMethod) -> dict:
    """`method` as INC's dict-form scale_method (INC >= 3.5 reads backoffs only from this form).

    INC maps the dict back onto its named method by (granularity, value type, rounding) and fills the
    opt candidates from that method, so only the backoffs can differ from the named method's.
    """

    def rule(tensor: TensorRule) -> dict:
        return {
            "granularity": tensor.granularity,
            "scale_value_type": _INC_VALUE[tensor.value],
            "rounding_method": _INC_ROUNDING[tensor.rounding],
            "backoff": tensor.backoff,
        }

    return {"default": {"weight": rule(method.weight), "activation": rule(method.activation)}}


def method_from_inc_dict(scale_method: dict) -> ScaleMethod | None:
    """The named method a dict-form scale_method's "default" stands for, its backoffs applied (None: no match)."""
    default = scale_method.get("default")
    if not isinstance(default, dict):
        return None
    found = (default.get(k) for k in ("weight", "activation"))
    rules: list[dict] = [rule if isinstance(rule, dict) else {} for rule in found]

    def key(rule: dict) -> tuple:
        return (
            str(rule.get("granularity", "pts")).lower(),
            str(rule.get("scale_value_type", "maxabs")).lower(),
            str(rule.get("rounding_method", "identity")).lower(),
        )

    for method in METHODS.values():
        named = inc_scale_method(method)["default"]
        if all(key(rule) == key(named[k]) for rule, k in zip(rules, ("weight", "activation"))):
            weight, activation = (rule.get("backoff", 1.0) for rule in rules)
            return replace(
                method,
                weight=replace(method.weight, backoff=weight),
                activation=replace(method.activation, backoff=activation),
            )
    return None


def get_method(
    name: str,
    *,
    input_backoff: float | None = None,
    weight_backoff: float | None = None,
    output_backoff: float | None = None,
) -> ScaleMethod:
    """The method called `name` (any case), with backoff overrides applied (see the module docstring)."""
    method = METHODS.get(name.lower())
    if method is None:
        raise ConfigError(f"unknown scale_method '{name}'", fix=f"use one of {', '.join(METHODS)}.")
    for key, value in (
        ("input_backoff", input_backoff),
        ("weight_backoff", weight_backoff),
        ("output_backoff", output_backoff),
    ):
        if value is not None and not 0 < value <= 1:
            raise ConfigError(f"scale_params.{key} is {value}", fix="use a backoff in (0, 1], e.g. 0.25 or 0.5.")
    if input_backoff is not None:
        method = replace(method, activation=replace(method.activation, backoff=input_backoff))
    if weight_backoff is not None:
        method = replace(method, weight=replace(method.weight, backoff=weight_backoff))
    if output_backoff is not None:
        method = replace(method, output_backoff=output_backoff)
    return method


def check_method_for_device(method: ScaleMethod, device: DeviceScales, *, dynamic: bool = False) -> None:
    if method.needs_hw_table and not device.has_hw_scales:
        raise ConfigError(
            f"scale_method '{method.name}' rounds to Gaudi HW scales, which {device.name} does not have",
            fix="use maxabs_pow2 or maxabs_arbitrary (or their pcs variants) on cuda/cpu.",
        )
    if method.dynamic_only and not dynamic:
        raise ConfigError(
            f"scale_method '{method.name}' works only with dynamic quantization (activation scales "
            "per token at run time)",
            fix='set "dynamic_quantization": true or pick a static method such as maxabs_hw / maxabs_pow2.',
        )


# ---- rounding -----------------------------------------------------------------------------------------


def pow2_ceil(scale: float) -> float:
    return 2.0 ** math.ceil(math.log2(scale))


def round_scale(scale: float, rounding: str, device: DeviceScales) -> float:
    """INC's round_scales_function for one raw scale, in the device's arithmetic."""
    if rounding == "identity":
        return scale
    if rounding == "unit":
        return 1.0
    if rounding == "hw_fixed":
        return device.hw_scales[0]
    exponent = device.math.ceil_log2(scale)
    if rounding == "pow2":
        return pow2(exponent)
    if rounding == "hw":
        return 2.0 ** hw_exponent(exponent, device.hw_factor, device.min_exponent, device.max_exponent)
    raise ConfigError(f"unknown rounding '{rounding}'", fix="use identity, pow2, hw, hw_fixed or unit.")


def scale_from_maxabs(maxabs: float, rule: TensorRule, device: DeviceScales, *, backoff: float | None = None) -> float:
    """One scale from a measured or computed max-abs value (pts; pcs applies this per channel)."""
    if rule.value == "fixed":
        return round_scale(1.0, rule.rounding, device)
    backoff = rule.backoff if backoff is None else backoff
    raw = device.math.raw(float(maxabs), device.fullscale, backoff)
    if not device.is_gaudi:
        raw = max(raw, MIN_SCALE)
    return round_scale(raw, rule.rounding, device)


def activation_scale(
    maxabs: float | Sequence, method: ScaleMethod, device: DeviceScales, *, backoff: float | None = None
) -> float:
    """Static activation scale; a per-channel measurement is reduced to its max like INC does."""
    return scale_from_maxabs(leaf_max(maxabs), method.activation, device, backoff=backoff)


def product(a, b, device: DeviceScales):
    """INC's `input0 * input1` for output scales: a bf16 tensor product on Gaudi (exact for powers of two)."""
    if isinstance(a, list) or isinstance(b, list):
        left = a if isinstance(a, list) else [a] * len(b)
        right = b if isinstance(b, list) else [b] * len(left)
        return [device.math.product(x, y) for x, y in zip(left, right, strict=True)]
    return device.math.product(a, b)


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
    `search_device` is the machine INC runs QUANTIZE on: its HW scales are maxabs_hw_opt_weight's
    candidates even when `device` (device_for_scales) is another (Gaudi2 scales on a Gaudi3).
    """

    method: ScaleMethod
    device: DeviceScales
    maxabs: float = 0.0
    errors: list[float] = field(default_factory=list)
    search_device: DeviceScales | None = None

    def candidates(self) -> tuple[float, ...]:
        if self.method.hw_candidates:
            return (self.search_device or self.device).hw_scales
        return self.method.weight.candidates

    @property
    def needs_tensor(self) -> bool:
        """opt methods search over the weight itself; the others only need its max-abs (`add_maxabs`)."""
        return self.method.weight.value == "opt"

    def add_maxabs(self, maxabs: float) -> None:
        self.maxabs = max(self.maxabs, maxabs)

    def add(self, weight) -> None:
        self.add_maxabs(float(weight.abs().max().float()) if weight.numel() else 0.0)
        if self.needs_tensor:
            full = (self.search_device or self.device).fullscale
            error = _bf16_error if self.device.is_gaudi else _float_error
            errors = [error(weight, s, full) for s in self.candidates()]
            self.errors = errors if not self.errors else [a + b for a, b in zip(self.errors, errors)]

    def scale(self) -> float:
        rule = self.method.weight
        if rule.value != "opt":
            return scale_from_maxabs(self.maxabs, rule, self.device)
        errors = self.errors
        if self.device.is_gaudi:  # INC compares torch.norm(x - y) of bf16 tensors: a bf16 number
            errors = [bf16(math.sqrt(e)) for e in errors]
        best = min(range(len(errors)), key=lambda i: (errors[i], -i))  # ties: INC keeps the later one (<=)
        return round_scale(self.candidates()[best], rule.rounding, self.device)


def _float_error(weight, scale: float, fullscale: float) -> float:
    return float(((weight.float() - fp8_round_trip(weight, scale, fullscale)) ** 2).sum())


def _bf16_error(weight, scale: float, fullscale: float) -> float:
    """INC's mmse_scale: `x - y` of bf16 tensors (rounded to bf16), squares summed as torch.norm does (float32)."""
    import torch

    x = weight.to(torch.bfloat16)
    y = (x / scale).clamp(-fullscale, fullscale).to(torch.float8_e4m3fn).to(torch.bfloat16) * scale
    return float(((x - y).float() ** 2).sum())


def fp8_round_trip(weight, scale, fullscale: float = 448.0):
    """weight -> FP8 with `scale` -> float32, what the server will compute with."""
    import torch

    scaled = (weight.float() / scale).clamp(-fullscale, fullscale)
    return scaled.to(torch.float8_e4m3fn).float() * scale


def channel_scales(weight, method: ScaleMethod, device: DeviceScales):
    """Per-output-channel weight scales (float32 [out_channels]) for the pcs methods."""
    if device.is_gaudi:
        return _gaudi_channel_scales(weight, method, device)
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


def _gaudi_channel_scales(weight, method: ScaleMethod, device: DeviceScales):
    """INC's MaxAbsPcs / OptScalesPcs on bf16 tensors: every step rounded to bf16 as on the HPU.

    CPU torch computes a bf16 op in float32 and rounds once, which for these ops (a product of two bf16
    values, log2, exp2 of an integer) is the HPU's result. The opt error is INC's `sum((x - y) ** 2)` with
    each step rounded to bf16; the HPU's accumulation order inside the sum is unknown here, so near-ties
    between candidates may resolve differently.
    """
    import torch

    rule = method.weight
    maxabs = weight.abs().amax(dim=1).to(torch.bfloat16)
    raw = maxabs * torch.tensor(bf16(1.0 / (device.fullscale * rule.backoff)), dtype=torch.bfloat16)
    raw = torch.maximum(raw, torch.tensor(BF16_TINY, dtype=torch.bfloat16))
    scales = _bf16_round(raw, rule.rounding)
    if rule.value != "opt":
        return scales.float()
    # INC's mmse_scale_multi, op for op: x = w^T [in, out], errors summed over dim 0, strict < (first wins)
    x = torch.transpose(weight.to(torch.bfloat16), 0, 1)
    best, best_err = torch.full_like(scales, -1.0), torch.full_like(scales, float("inf"))
    for factor in rule.candidates:
        factors = torch.full_like(scales, factor)
        trial = scales[None, :] * factors
        y = (x / trial).clamp(-device.fullscale, device.fullscale).to(torch.float8_e4m3fn).to(torch.bfloat16) * trial
        err = torch.sum((x - y) ** 2, dim=0)
        better = err < best_err
        best, best_err = torch.where(better, factors, best), torch.where(better, err, best_err)
    return _bf16_round(best * scales, rule.rounding).float()


def _bf16_round(scales, rounding: str):
    import torch

    if rounding == "pow2":
        return torch.exp2(torch.ceil(torch.log2(scales)))
    if rounding == "identity":
        return scales
    raise ConfigError(
        f"per-channel weight scales with rounding '{rounding}' are not an INC method",
        fix="use a pcs method whose weights round to pow2.",
    )
