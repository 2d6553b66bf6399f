"""quantization_config comes from compressed-tensors' own classes; the fallback dict says the same things."""

from __future__ import annotations

import itertools

import pytest

from ray_calib.convert.qconfig import compressed_tensors_config, fallback_config

COMBOS = list(itertools.product((False, True), repeat=3))


@pytest.mark.parametrize("per_channel,dynamic,fp8_kv", COMBOS)
def test_library_config_validates_and_matches_the_fallback(per_channel, dynamic, fp8_kv):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStrategy

    kwargs = dict(per_channel=per_channel, dynamic_activations=dynamic, fp8_kv=fp8_kv)
    written = compressed_tensors_config(**kwargs)
    parsed = QuantizationConfig.model_validate({k: v for k, v in written.items() if k != "producer"})
    scheme = parsed.config_groups["group_0"]
    assert scheme.targets == ["Linear"] and parsed.format == "float-quantized"
    assert parsed.quantization_status == "compressed" and "lm_head" in parsed.ignore
    assert scheme.weights.strategy == (QuantizationStrategy.CHANNEL if per_channel else QuantizationStrategy.TENSOR)
    assert scheme.input_activations.dynamic is dynamic
    assert (parsed.kv_cache_scheme is not None) is fp8_kv
    # the hand-written fallback (installs without compressed-tensors) parses to the same config
    fallback = QuantizationConfig.model_validate(
        {k: v for k, v in fallback_config(**kwargs).items() if k != "producer"}
    )
    assert fallback.model_dump() == parsed.model_dump()
