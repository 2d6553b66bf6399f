"""Before `measure` writes anything final: does the run hold every range `quantize` will need?

`quantize` converts every linear weight of the checkpoint and refuses a measurement that lacks the
input range of one (`measurements.match.match_measurement` is that rule; it is used here as is). A gap --
a module the chosen vLLM backend never ran, a module no observer covers -- therefore fails the
measurement that caused it, naming the module and the backend, not a later `quantize`. Routed
experts that got no token are not gaps: quantize gives them their layer's range.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ray_calib.errors import ModelError
from ray_calib.inc import RankFile
from ray_calib.measurements import unify_ranks
from ray_calib.measurements.match import match_measurement
from ray_calib.model import names
from ray_calib.model.checkpoint import Checkpoint

_FIX = (
    "the rank files were not written; measure with another --attention-backend, or report the module "
    "(the observers do not cover it), then rerun with --force"
)


def check_quantizable(
    model: Path,
    rank_files: Sequence[RankFile],
    backends: dict[str, list[str]],
    block_names: Sequence[str] = (),
    *,
    expert_parallel: bool = False,
) -> None:
    """Raise a one-line ModelError naming the first module quantize would find without a range."""
    merged = rank_files[0]
    if len(rank_files) > 1:
        merged = unify_ranks(list(rank_files), 1, expert_parallel=expert_parallel)[0]
    match = match_measurement(Checkpoint.open(model).tensors, merged.nodes)
    if match.complete:
        return
    where = describe_backends(backends)
    if match.unmeasured:
        tensor = match.unmeasured[0]
        prefix = tensor.removesuffix(".weight")
        observed = {ckpt: module for module in merged.mod_list for ckpt in names.checkpoint_modules(module)}
        module = observed.get(prefix)
        more = f" (and {len(match.unmeasured) - 1} more weights)" if len(match.unmeasured) > 1 else ""
        if module is not None:
            reason = f"{module} has no input range: it never ran under {where}"
        elif any(re.search(pattern, prefix) for pattern in block_names):
            reason = f"{prefix} is skipped by the measure blocklist (--quant-config)"
        else:
            reason = f"no observer covers {prefix} ({where})"
        raise ModelError(f"{reason}, but quantize converts {tensor}{more}", fix=_FIX)
    module = match.missing[0]
    expected = ", ".join(f"{p}.weight" for p in names.checkpoint_modules(module))
    raise ModelError(
        f"{module} was measured under {where} but the checkpoint {model} has no {expected}",
        fix="measure the model you will quantize; if it is that model, report the module name",
    )


def describe_backends(backends: dict[str, list[str]]) -> str:
    """'vLLM attention backend AMX_MLA, MoE kernel CPUUnquantizedExperts' (or what is known of it)."""
    parts = []
    if backends.get("attention"):
        parts.append(f"vLLM attention backend {'/'.join(backends['attention'])}")
    if backends.get("moe"):
        parts.append(f"MoE kernel {'/'.join(backends['moe'])}")
    return ", ".join(parts) or "the vLLM backends of this run (not recorded: all chunks were reused)"
