"""INC scale semantics: the worked Gaudi2 example, device tables, rounding properties, method errors."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_calib.errors import ConfigError
from ray_calib.inc.devices import DEVICES, device_for_scales, get_device
from ray_calib.inc.methods import (
    METHODS,
    MIN_SCALE,
    activation_scale,
    check_method_for_device,
    get_method,
    round_scale,
    scale_from_maxabs,
)

GAUDI2, GAUDI3, CPU = DEVICES["gaudi2"], DEVICES["gaudi3"], DEVICES["cpu"]


def test_worked_gaudi2_example_design_section_5():
    method = get_method("maxabs_hw")
    # o_proj input maxabs 0.0918 -> /60 -> pow2 2^-9 -> HW 2^-8
    assert 0.091796875 / (240 * 0.25) == pytest.approx(0.00153, rel=1e-2)
    assert round_scale(0.091796875 / 60, "pow2", GAUDI2) == 2.0**-9
    assert activation_scale([[0.091796875]], method, GAUDI2) == 0.00390625
    # o_proj weight 0.625 -> /120 -> 2^-7 -> HW 2^-4
    assert round_scale(0.625 / 120, "pow2", GAUDI2) == 2.0**-7
    assert scale_from_maxabs(0.625, method.weight, GAUDI2) == 0.0625


def test_device_tables():
    assert GAUDI2.fullscale == 240 and GAUDI2.hw_scales == (16.0, 1.0, 1 / 16, 1 / 256)
    assert GAUDI3.fullscale == 448 and GAUDI3.hw_scales[0] == 2.0**7 and GAUDI3.hw_scales[-1] == 2.0**-55
    assert len(GAUDI3.hw_scales) == 63
    assert DEVICES["cuda"].fullscale == CPU.fullscale == 448 and not CPU.has_hw_scales


def test_backoffs_default_and_override():
    method = get_method("maxabs_arbitrary")
    assert method.activation.backoff == 0.25 and method.weight.backoff == 0.5
    assert activation_scale(448.0, method, CPU) == pytest.approx(4.0)
    custom = get_method("MAXABS_ARBITRARY", input_backoff=1.0, weight_backoff=1.0)
    assert activation_scale(448.0, custom, CPU) == pytest.approx(1.0)
    assert scale_from_maxabs(448.0, custom.weight, CPU) == pytest.approx(1.0)


def test_unit_and_single_hw_scale():
    assert activation_scale(123.0, get_method("unit_scale"), CPU) == 1.0
    assert activation_scale(123.0, get_method("hw_aligned_single_scale"), GAUDI2) == 16.0


def _gaudi_slack(exact: float) -> float:
    """How far below `exact` INC's bf16 arithmetic may land: the raw scale is 3 bf16 roundings off (each
    <= 2^-9 relative), and log2 is rounded to bf16 (half an ulp: 2^(k-8) for |log2| in [2^k, 2^(k+1)))
    before the ceil, which can drop a power of two by up to that fraction of an octave."""
    log2 = abs(math.log2(exact))
    half_ulp = 2.0 ** (math.floor(math.log2(log2)) - 8) if log2 >= 1 else 2.0**-9
    return (1 - 2.0**-9) ** 3 * 2.0**-half_ulp


@settings(max_examples=300, deadline=None)
@given(
    maxabs=st.floats(min_value=1e-30, max_value=1e6, allow_nan=False),
    name=st.sampled_from(["maxabs_pow2", "maxabs_hw", "maxabs_arbitrary"]),
    device=st.sampled_from(["gaudi2", "gaudi3", "cpu"]),
)
def test_scales_cover_maxabs_and_are_pow2_where_they_must_be(maxabs, name, device):
    """CPU: never below maxabs / (fullscale * backoff). Gaudi: INC's bf16 math may land below it, by a derived bound."""
    dev = get_device(device)
    method = get_method(name)
    if method.needs_hw_table and not dev.has_hw_scales:
        return
    for rule in (method.activation, method.weight):
        scale = scale_from_maxabs(maxabs, rule, dev)
        exact = maxabs / (dev.fullscale * rule.backoff)
        floor = exact * (_gaudi_slack(exact) if dev.is_gaudi else 1 - 1e-12)
        if rule.rounding in ("pow2", "hw"):
            assert math.log2(scale) == int(math.log2(scale))  # a power of two
        if rule.rounding == "hw":
            exponent = int(math.log2(scale))
            assert exponent % dev.hw_factor == 0 and dev.min_exponent <= exponent <= dev.max_exponent
            clamped = exponent == dev.max_exponent and exact > scale
            if not clamped:
                assert scale >= floor
        else:
            assert scale >= floor
        if rule.rounding == "pow2":
            assert scale < 2 * exact * (1 + (2.0**-7 if dev.is_gaudi else 1e-12)) or exact < 1e-37
        assert scale_from_maxabs(maxabs * 1.5, rule, dev) >= scale  # monotone in maxabs


def test_hw_methods_need_gaudi():
    with pytest.raises(ConfigError, match="maxabs_hw.*cpu does not have"):
        check_method_for_device(get_method("maxabs_hw"), CPU)


def test_dynamic_method_needs_dynamic_quantization():
    method = get_method("act_maxabs_pcs_pow2_weight_maxabs_pts_pow2_hw")
    with pytest.raises(ConfigError, match="only with dynamic quantization"):
        check_method_for_device(method, GAUDI2)
    check_method_for_device(method, GAUDI2, dynamic=True)


def test_unknown_method_and_bad_backoff():
    with pytest.raises(ConfigError, match="unknown scale_method 'maxabs_fast'"):
        get_method("maxabs_fast")
    with pytest.raises(ConfigError, match="scale_params.input_backoff is 1.5"):
        get_method("maxabs_hw", input_backoff=1.5)


def test_device_for_scales_rules():
    assert device_for_scales("gaudi3", "gaudi2", "maxabs_hw").name == "gaudi2"
    assert device_for_scales("gaudi2", None, "maxabs_pow2").name == "gaudi2"
    with pytest.raises(ConfigError, match="needs scale_method maxabs_hw"):
        device_for_scales("gaudi3", "gaudi2", "maxabs_pow2")
    with pytest.raises(ConfigError, match="cannot be used on 'gaudi2'"):
        device_for_scales("gaudi2", "gaudi3", "maxabs_hw")


def test_every_issue_method_is_known():
    for name in (
        "unit_scale",
        "maxabs_arbitrary",
        "maxabs_pow2",
        "maxabs_hw",
        "maxabs_hw_opt_weight",
        "maxabs_pow2_opt_weight",
        "act_maxabs_hw_weights_pcs_maxabs_pow2",
        "act_maxabs_pow2_weights_pcs_maxabs_pow2",
        "act_maxabs_hw_weights_pcs_opt_pow2",
        "act_maxabs_pow2_weights_pcs_opt_pow2",
        "act_maxabs_pcs_pow2_weight_maxabs_pts_pow2_hw",
    ):
        assert name in METHODS


def test_weight_scales_from_tensors():
    torch = pytest.importorskip("torch")
    from ray_calib.inc.methods import WeightScaleSearch, channel_scales, fp8_round_trip

    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(64, 128, generator=gen) * torch.linspace(0.01, 2, 64)[:, None]).to(torch.bfloat16)
    pow2 = WeightScaleSearch(get_method("maxabs_pow2"), CPU)
    pow2.add(weight)
    assert pow2.scale() == round_scale(float(weight.abs().max().float()) / 224, "pow2", CPU)
    opt = WeightScaleSearch(get_method("maxabs_pow2_opt_weight"), CPU)
    opt.add(weight)
    err = lambda s: float(((weight.float() - fp8_round_trip(weight, s)) ** 2).sum())  # noqa: E731
    assert err(opt.scale()) <= min(err(2.0**e) for e in range(-10, 10)) + 1e-9
    hw_opt = WeightScaleSearch(get_method("maxabs_hw_opt_weight"), GAUDI2)
    hw_opt.add(weight)
    assert hw_opt.scale() in GAUDI2.hw_scales
    per_channel = channel_scales(weight, get_method("act_maxabs_pow2_weights_pcs_maxabs_pow2"), CPU)
    assert per_channel.shape == (64,) and bool((per_channel >= weight.abs().amax(1).float() / 224).all())
    opt_pc = channel_scales(weight, get_method("act_maxabs_pow2_weights_pcs_opt_pow2"), CPU)
    rows_err = ((weight.float() - fp8_round_trip(weight, opt_pc[:, None])) ** 2).sum(1)
    base_err = ((weight.float() - fp8_round_trip(weight, per_channel[:, None])) ** 2).sum(1)
    assert bool((rows_err <= base_err + 1e-9).all())


def test_zero_maxabs_like_inc_on_gaudi_and_lifted_elsewhere():
    """INC: a measured 0 gives scale 0 (pow2, arbitrary) and the lowest HW scale (hw); CPU/CUDA never write 0."""
    assert activation_scale([[0.0]], get_method("maxabs_pow2"), GAUDI3) == 0.0
    assert activation_scale([[0.0]], get_method("maxabs_arbitrary"), GAUDI2) == 0.0
    assert activation_scale([[0.0]], get_method("maxabs_hw"), GAUDI3) == 2.0**-55
    assert activation_scale([[0.0]], get_method("maxabs_hw"), GAUDI2) == 2.0**-8
    assert activation_scale([[0.0]], get_method("maxabs_pow2"), CPU) == 2.0**-126
    assert activation_scale([[0.0]], get_method("maxabs_arbitrary"), CPU) == MIN_SCALE


def test_bf16_worked_examples_gaudi3():
    """Published Gaudi3 scales one power of two below float64 math, because log2 is rounded to bf16."""
    method = get_method("maxabs_hw")
    assert scale_from_maxabs(0.220703125, method.weight, GAUDI3) == 2.0**-10  # float64: 2^-9
    assert math.ceil(math.log2(0.220703125 / 224)) == -9
    assert activation_scale([[0.88671875]], method, GAUDI3) == 2.0**-7  # v_cache; float64: 2^-6
    assert math.ceil(math.log2(0.88671875 / 112)) == -6
    assert activation_scale([[0.88671875]], get_method("maxabs_pow2"), DEVICES["cuda"]) == 2.0**-6  # float64 on CUDA


def test_e5m2_changes_only_the_full_scale():
    e5m2 = GAUDI3.with_fp8_format("E5M2")
    assert e5m2.fullscale == 57344.0 and e5m2.hw_scales == GAUDI3.hw_scales
    assert scale_from_maxabs(57344.0 * 0.5, get_method("maxabs_pow2").weight, e5m2) == 1.0
    with pytest.raises(ConfigError, match="E5M2 is for INC on Gaudi"):
        CPU.with_fp8_format("e5m2")


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if not m.dynamic_only])
@pytest.mark.parametrize("backoffs", [None, (0.7, 0.9)])
def test_dict_form_scale_method_is_read_by_inc_as_the_named_method(name, backoffs):
    """INC's own parser (3.5+) maps our dict-form scale_method onto the same named method and keeps the backoffs."""
    parser = pytest.importorskip("neural_compressor.torch.algorithms.fp8_quant._core.scale_methods.scale_method_parser")
    from neural_compressor.torch.algorithms.fp8_quant._core.scale_methods.scale_method_config import (
        CfgStr,
        ScaleMethodString,
        get_scale_method_from_config,
        scale_method_config_mapping,
    )

    from ray_calib.inc.methods import inc_scale_method, method_from_inc_dict

    weight, activation = backoffs or (None, None)
    ours = get_method(name, weight_backoff=weight, input_backoff=activation)
    parsed = parser.parse_scale_method(parser.convert_scale_method_strings_to_enum(inc_scale_method(ours)))
    parser.validate_and_populate_scale_method(parsed)
    default = parsed[CfgStr.DEFAULT]
    named = ScaleMethodString[name.upper()]
    assert get_scale_method_from_config(default) == named
    expected = scale_method_config_mapping[named]
    want = (weight or expected[CfgStr.WEIGHT].backoff, activation or expected[CfgStr.ACTIVATION].backoff)
    assert (default[CfgStr.WEIGHT].backoff, default[CfgStr.ACTIVATION].backoff) == want
    assert default[CfgStr.WEIGHT].params == expected[CfgStr.WEIGHT].params  # opt candidates filled in by INC
    assert method_from_inc_dict(inc_scale_method(ours)) == ours
