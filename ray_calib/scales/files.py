"""Range files -> INC scale files (`<prefix>_hooks_maxabs_<METHOD>_<rank>_<world>.{json,npz}`), per rank.

Each node is turned into INC's scale node for its op type (`scales.ops`), in INC's arithmetic for the
device (`inc.arith`), for the INC release the files target (`inc.target`). Nodes are written for
every measured module except those a QUANTIZE blocklist name pattern matches (INC writes only the
modules it patches). INC itself writes and reads no scale file for unit_scale / hw_aligned_single_scale
or for dynamic quantization; the first two are written here for inspection, the dynamic methods refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ray_calib.atomic import staged_dir
from ray_calib.errors import ConfigError
from ray_calib.inc import MODE_SCALE, MeasurementSet, RankFile, expert_layout, write_rank_file
from ray_calib.inc.devices import DeviceScales, default_method, device_for_scales, get_device
from ray_calib.inc.methods import ScaleMethod, check_method_for_device, get_method
from ray_calib.inc.optypes import op_type
from ray_calib.inc.target import IncTarget, parse_version
from ray_calib.scales.ops import ScaleRules, WeightSource
from ray_calib.scales.weights import CheckpointWeights


@dataclass
class ScaleRun:
    in_dir: Path
    out_dir: Path
    method: ScaleMethod
    device: DeviceScales
    target: IncTarget = field(default_factory=IncTarget)
    ranks: int = 0
    nodes: int = 0
    from_weights: int = 0  # weight scales computed from checkpoint tensors
    blocked: int = 0  # nodes left out by --blocklist
    notes: list[str] = field(default_factory=list)


def scale_rank_file(rank_file: RankFile, rules: ScaleRules, blocklist: tuple[str, ...] = ()) -> RankFile:
    layout = expert_layout(rank_file)
    patterns = [re.compile(p) for p in blocklist]
    nodes = {}
    for module, node in rank_file.nodes.items():
        if any(p.search(module) for p in patterns):
            continue
        kind = op_type(module, node, layout.ops)
        nodes[module] = rules.scale_node(module, node, kind, layout.local_experts)
    name = rank_file.name.__class__(
        rank_file.name.prefix, rules.method.file_tag, rank_file.name.rank, rank_file.name.world_size
    )
    return RankFile(name=name, nodes=nodes, mode=MODE_SCALE)


def write_scale_files(
    in_dir: Path,
    out_dir: Path,
    method: ScaleMethod,
    device: DeviceScales,
    weights: Callable[[RankFile], WeightSource] | None = None,  # each rank's weight scales
    *,
    target: IncTarget | None = None,
    blocklist: tuple[str, ...] = (),
) -> ScaleRun:
    """Scale files for every rank of the run in `in_dir`, moved into `out_dir` only when all ranks succeeded."""
    measurements = MeasurementSet.discover(in_dir)
    run = ScaleRun(
        in_dir=Path(in_dir), out_dir=Path(out_dir), method=method, device=device, target=target or IncTarget()
    )
    with staged_dir(out_dir) as stage:
        for index in range(len(measurements.names)):
            rank_file = measurements.read(index)
            rank_weights = weights(rank_file) if weights else None
            rules = ScaleRules(method, device, run.target, rank_weights)
            scaled = scale_rank_file(rank_file, rules, blocklist)
            write_rank_file(scaled, stage)
            run.ranks += 1
            run.nodes = len(scaled.nodes)
            run.blocked = len(rank_file.nodes) - len(scaled.nodes)
            run.from_weights += rules.from_weights
    return run


@dataclass
class ScaleRequest:
    """What `ray-calib scales` was asked for (None: the default)."""

    in_dir: Path
    out_dir: Path
    method: str | None = None
    device: str | None = None
    device_for: str | None = None
    weights_dir: Path | None = None
    input_backoff: float | None = None
    weight_backoff: float | None = None
    output_backoff: float | None = None
    inc_version: str | None = None
    fp8_format: str = "E4M3"
    allreduce_quantization: bool = False
    blocklist: tuple[str, ...] = ()


def make_scales(request: ScaleRequest) -> ScaleRun:
    """`ray-calib scales`: resolve method, device and INC target (default: the sidecar's device), write the files."""
    meta = MeasurementSet.discover(request.in_dir).meta
    device = request.device or (meta.device_type if meta and meta.device_type else None)
    if device is None:
        raise ConfigError(
            f"{request.in_dir}: no ray_calib_meta.json says which device measured this",
            fix="pass --device gaudi2|gaudi3|cuda|cpu.",
        )
    method = get_method(
        request.method or default_method(device),
        input_backoff=request.input_backoff,
        weight_backoff=request.weight_backoff,
        output_backoff=request.output_backoff,
    )
    if method.dynamic_only:
        raise ConfigError(
            f"scale_method '{method.name}' is dynamic quantization: activation scales are computed per "
            "token at run time, and INC writes and reads no scale file for it",
            fix="use a static method (maxabs_hw, maxabs_pow2, ...) for scale files.",
        )
    scales_device = device_for_scales(device, request.device_for, method.name).with_fp8_format(request.fp8_format)
    check_method_for_device(method, scales_device)
    for pattern in request.blocklist:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(
                f"--blocklist {pattern!r} is not a valid regex ({err})",
                fix="names are Python regexes (re.search), as QUANT_CONFIG's blocklist.names.",
            ) from None
    target = IncTarget(
        parse_version(request.inc_version) if request.inc_version else IncTarget().version,
        allreduce_quantization=request.allreduce_quantization,
    )
    custom = any(b is not None for b in (request.input_backoff, request.weight_backoff, request.output_backoff))
    notes = target.check(output_backoff=request.output_backoff, custom_backoff=custom)
    weights = None
    if request.weights_dir and not method.fixed:
        checkpoint = CheckpointWeights(request.weights_dir, method, scales_device, search_device=get_device(device))
        weights = checkpoint.for_rank
    run = write_scale_files(
        request.in_dir, request.out_dir, method, scales_device, weights, target=target, blocklist=request.blocklist
    )
    if method.fixed:
        notes.append(
            f"INC writes and reads no scale file for {method.name} (every scale is fixed); these are for inspection"
        )
    run.notes = notes
    return run
