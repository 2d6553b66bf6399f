"""quantization_config is what compressed-tensors' own classes write for the same scheme, to the field."""

from __future__ import annotations

import itertools

import pytest

from ray_calib.convert.qconfig import compressed_tensors_config
from ray_calib.model.names import KEEP_MODULES

COMBOS = list(itertools.product((False, True), repeat=3))


def library_config(*, per_channel: bool, dynamic_activations: bool, fp8_kv: bool) -> dict:
    """The config built with compressed-tensors' QuantizationArgs/Scheme/Config and dumped as JSON."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    def args(strategy: str, dynamic: bool = False) -> QuantizationArgs:
        return QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=dynamic)

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=args("channel" if per_channel else "tensor"),
        input_activations=args("token", dynamic=True) if dynamic_activations else args("tensor"),
    )
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        ignore=list(KEEP_MODULES),
        format="float-quantized",
        quantization_status="compressed",
        kv_cache_scheme=args("tensor") if fp8_kv else None,
    )
    return config.model_dump(mode="json")


@pytest.mark.parametrize("per_channel,dynamic,fp8_kv", COMBOS)
def test_written_config_is_the_librarys_own_dump_and_validates(per_channel, dynamic, fp8_kv):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStrategy

    kwargs = dict(per_channel=per_channel, dynamic_activations=dynamic, fp8_kv=fp8_kv)
    written = compressed_tensors_config(**kwargs)
    assert written.pop("producer") == {"name": "ray-calib"}
    assert written == library_config(**kwargs)
    parsed = QuantizationConfig.model_validate(written)
    scheme = parsed.config_groups["group_0"]
    assert scheme.weights.strategy == (QuantizationStrategy.CHANNEL if per_channel else QuantizationStrategy.TENSOR)
    assert scheme.input_activations.dynamic is dynamic
    assert (parsed.kv_cache_scheme is not None) is fp8_kv
    assert parsed.model_dump(mode="json") == written  # a round trip through the library changes nothing


def test_quantize_does_not_import_compressed_tensors():
    """Writing the config stays numpy-only: the library's import pulls torch and transformers."""
    import subprocess
    import sys

    code = (
        "import sys; from ray_calib.convert.qconfig import compressed_tensors_config as c; "
        "c(per_channel=True, dynamic_activations=False, fp8_kv=True); "
        "print(sorted(m for m in ('compressed_tensors', 'torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
