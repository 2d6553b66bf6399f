"""Which INC the scale files are for: the rules that changed between INC releases, in one place.

    rule                                   INC <= 3.3   3.4        3.5 - 3.8.0   >= 3.8.1
    RowParallelLinear op type              linear       row_parallel_linear (output from the measured
                                                        pre-all-reduce max, not input x weight)
    batch2block/block2batch matmul         matmul (input 1 measured)             b2b_matmul (input 1 from
                                                                                 the measured output)
    MoE per-expert scales (E)              num_experts (all measured)  local_num_experts
    backoff overrides                      scale_params: input_, weight_,  only a dict-form scale_method
                                           output_backoff                  {"activation": {"backoff": ..}}
    row_parallel_linear_allreduce_quantization  -  outputs [A(out0), A(out1)], backoff 1.0
                                                   (>= 3.9: INC raises AttributeError, so refused here)
The default is the newest INC (3.10; fp8_quant has not changed since 3.9).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ray_calib.errors import ConfigError

LATEST = (3, 10)
_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?$")


def parse_version(text: str) -> tuple[int, int, int]:
    match = _VERSION_RE.match(text.strip())
    if not match:
        raise ConfigError(f"INC version '{text}' is not MAJOR.MINOR[.PATCH]", fix="e.g. --inc-version 3.4 or 3.8.1.")
    version = (int(match[1]), int(match[2]), int(match[3] or 0))
    if version < (3, 0, 0):
        raise ConfigError(f"INC version {text} has no fp8_quant scale files", fix="use 3.0 or newer.")
    return version


@dataclass(frozen=True)
class IncTarget:
    version: tuple[int, int, int] = (*LATEST, 0)
    allreduce_quantization: bool = False  # QUANT_CONFIG row_parallel_linear_allreduce_quantization

    @property
    def label(self) -> str:
        return ".".join(map(str, self.version[:2] if self.version[2] == 0 else self.version))

    @property
    def row_parallel_op(self) -> bool:
        """RowParallelLinear is its own op type (commit 16c7f66fb4, v3.4)."""
        return self.version >= (3, 4, 0)

    @property
    def b2b_op(self) -> bool:
        """batch2block/block2batch take input 1's scale from their output (commit 6840f31a89, v3.8.1)."""
        return self.version >= (3, 8, 1)

    @property
    def local_experts(self) -> bool:
        """MoE ops size their per-expert scales by local_num_experts (commit 8be3e3ec47, v3.5)."""
        return self.version >= (3, 5, 0)

    @property
    def reads_scale_params(self) -> bool:
        """scale_params backoffs are read up to v3.4 (dropped in commit 92ae08a82e, v3.5)."""
        return self.version <= (3, 4, 99)

    def check(self, *, output_backoff: float | None, custom_backoff: bool) -> list[str]:
        """Refuse what this INC cannot do; return notes on what it does differently with these options."""
        notes = []
        if output_backoff is not None and not self.reads_scale_params:
            raise ConfigError(
                f"INC {self.label} has no output_backoff (row-parallel outputs use the activation backoff)",
                fix="drop --output-backoff, or target INC 3.4 with --inc-version 3.4.",
            )
        if self.allreduce_quantization and not self.row_parallel_op:
            raise ConfigError(
                f"INC {self.label} has no row_parallel_linear_allreduce_quantization",
                fix="drop --allreduce-quantization or use --inc-version 3.4 or newer.",
            )
        if self.allreduce_quantization and self.version >= (3, 9, 0):
            raise ConfigError(
                f"INC {self.label} fails on row_parallel_linear_allreduce_quantization (AttributeError "
                "in LinearOpQuantizer: no output_scale_method_config)",
                fix="drop --allreduce-quantization, or target an INC 3.4-3.8 with --inc-version.",
            )
        if custom_backoff and not self.reads_scale_params:
            notes.append(
                f"INC {self.label} ignores scale_params backoffs: these files match a dict-form scale_method "
                'with "backoff", which also makes INC recompute scales instead of reading this file '
                "(recalc_scales)"
            )
        return notes
