"""What each device can represent: FP8 full scale and the hardware scale table.

Gaudi's FP8 cast applies a scale for free only when it is one of the exponent biases the hardware
has: Gaudi2 has four (3/7/11/15, i.e. scales 16, 1, 1/16, 1/256; full scale 240 because its e4m3 is
the `fnuz` flavour), Gaudi3 has 63 (scales 2^7 .. 2^-55, full scale 448). CUDA and CPU take any
float scale (full scale 448) and have no HW table, so `maxabs_hw` methods are Gaudi-only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ray_calib.errors import ConfigError
from ray_calib.inc.arith import FloatMath, GaudiMath

DEVICE_TYPES = ("gaudi2", "gaudi3", "cuda", "cpu")
FP8_FORMATS = ("E4M3", "E5M2")
E5M2_FULLSCALE = 57344.0  # torch.finfo(torch.float8_e5m2).max, on Gaudi2 and Gaudi3 alike


def default_method(device: str) -> str:
    """Gaudi rounds scales to its HW table; elsewhere any scale works."""
    return "maxabs_hw" if device.startswith("gaudi") else "maxabs_arbitrary"


@dataclass(frozen=True)
class DeviceScales:
    name: str
    fullscale: float  # largest float8_e4m3 magnitude the device represents
    hw_exponents: tuple[int, ...] = ()  # log2 of every HW scale, largest first; empty: no HW scales
    hw_factor: int = 1  # HW exponents are multiples of this (Gaudi2: 4)
    fp8_format: str = "E4M3"

    @property
    def is_gaudi(self) -> bool:
        return self.name.startswith("gaudi")

    @property
    def math(self) -> type[GaudiMath] | type[FloatMath]:
        """INC's bf16 HPU arithmetic on Gaudi; float64 on CPU/CUDA (ray-calib's own checkpoint, no INC)."""
        return GaudiMath if self.is_gaudi else FloatMath

    def with_fp8_format(self, fp8_format: str) -> DeviceScales:
        """QUANT_CONFIG's fp8_config. E5M2 changes only the full scale: INC's HW_ALIGNED rounding and
        hw_aligned_single_scale read the E4M3 tables (FP8_143_SCALES) whatever the format."""
        fmt = fp8_format.upper()
        if fmt not in FP8_FORMATS:
            raise ConfigError(f"unknown fp8 format '{fp8_format}'", fix="use E4M3 or E5M2.")
        if fmt == "E4M3":
            return self
        if not self.is_gaudi:
            raise ConfigError(
                f"fp8 format E5M2 is for INC on Gaudi; {self.name} FP8 checkpoints are float8_e4m3fn",
                fix="drop --fp8-format E5M2 (or use --device gaudi2/gaudi3).",
            )
        return replace(self, fullscale=E5M2_FULLSCALE, fp8_format=fmt)

    @property
    def has_hw_scales(self) -> bool:
        return bool(self.hw_exponents)

    @property
    def hw_scales(self) -> tuple[float, ...]:
        return tuple(2.0**e for e in self.hw_exponents)

    @property
    def min_exponent(self) -> int:
        return min(self.hw_exponents)

    @property
    def max_exponent(self) -> int:
        return max(self.hw_exponents)


DEVICES: dict[str, DeviceScales] = {
    # INC fp_utils: scale = 2^(7 - exp_bias), exp_bias in {3, 7, 11, 15} (Gaudi2) or 0..62 (Gaudi3).
    "gaudi2": DeviceScales("gaudi2", 240.0, tuple(7 - bias for bias in (3, 7, 11, 15)), hw_factor=4),
    "gaudi3": DeviceScales("gaudi3", 448.0, tuple(7 - bias for bias in range(63)), hw_factor=1),
    "cuda": DeviceScales("cuda", 448.0),
    "cpu": DeviceScales("cpu", 448.0),
}


def get_device(name: str) -> DeviceScales:
    try:
        return DEVICES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown device '{name}'", fix=f"use one of {', '.join(DEVICE_TYPES)}.") from None


def device_for_scales(device: str, override: str | None, method: str) -> DeviceScales:
    """The device whose tables shape the scales; INC allows only Gaudi2 scales on Gaudi3 with maxabs_hw.

    (Gaudi2's coarse scales are a subset of Gaudi3's, so a Gaudi3 can serve Gaudi2-calibrated scales;
    the reverse would need scales Gaudi2 cannot apply.)
    """
    run_on = get_device(device)
    if override is None or override.lower() == run_on.name:
        return run_on
    scales_of = get_device(override)
    if not (scales_of.name == "gaudi2" and run_on.name == "gaudi3"):
        raise ConfigError(
            f"device_for_scales '{scales_of.name}' cannot be used on '{run_on.name}'",
            fix="only Gaudi2 scales on Gaudi3 are supported; drop device_for_scales.",
        )
    if method.lower() != "maxabs_hw":
        raise ConfigError(
            f"device_for_scales '{scales_of.name}' needs scale_method maxabs_hw, not '{method}'",
            fix="use scale_method maxabs_hw or drop device_for_scales.",
        )
    return scales_of
