"""Range files -> INC scale files (`<prefix>_hooks_maxabs_<METHOD>_<rank>_<world>.{json,npz}`), per rank.

Per node: every input gets an activation scale; a linear layer (a node with `params.weight`) gets a
weight scale and one output scale = input x weight; a matmul gets output = input0 x input1; the fused
MoE op keeps its hidden-input scale in inputs[0] and puts the per-expert intermediate scales (from
its outputs[1:]) in inputs[1:], which is where INC (and `unify`) expect them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ray_calib.errors import ConfigError
from ray_calib.measurements import MODE_SCALE, MeasurementSet, RankFile, expert_layout, write_rank_file
from ray_calib.scales.devices import DeviceScales
from ray_calib.scales.methods import ScaleMethod, activation_scale, leaf_max, scale_from_maxabs

_MATMULS = ("matmul_qk", "matmul_av", "batch2block_matmul", "block2batch_matmul")
WeightScale = Callable[[str], "float | list[float] | None"]  # module -> scale from real weights, or None


@dataclass
class ScaleRun:
    in_dir: Path
    out_dir: Path
    method: ScaleMethod
    device: DeviceScales
    ranks: int = 0
    nodes: int = 0
    from_weights: int = 0  # weight scales computed from checkpoint tensors


def scale_rank_file(rank_file: RankFile, method: ScaleMethod, device: DeviceScales,
                    weight_scale: WeightScale | None = None, counter: ScaleRun | None = None) -> RankFile:
    ops = expert_layout(rank_file).ops
    nodes = {}
    for module, node in rank_file.nodes.items():
        act = [activation_scale(leaf, method, device) for leaf in node.get("inputs", [])]
        out: dict = {"inputs": act}
        if module in ops:
            outputs = node.get("outputs", [])
            out["inputs"] = act[:1] + [activation_scale(leaf, method, device) for leaf in outputs[1:]]
            out["outputs"] = [activation_scale(leaf, method, device) for leaf in outputs[:1]]
        elif "weight" in node.get("params", {}):
            weight = weight_scale(module) if weight_scale else None
            if weight is not None and counter:
                counter.from_weights += 1
            weight = _measured_weight_scale(module, node["params"]["weight"], method, device) if weight is None else weight
            out["params"] = {"weight": weight}
            if act:
                out["outputs"] = [act[0] * (max(weight) if isinstance(weight, list) else weight)]
        elif module.rsplit(".", 1)[-1] in _MATMULS and len(act) >= 2:
            out["outputs"] = [act[0] * act[1]]
        elif "outputs" in node:
            out["outputs"] = [activation_scale(leaf, method, device) for leaf in node["outputs"]]
        nodes[module] = out
    name = rank_file.name.__class__(rank_file.name.prefix, method.file_tag, rank_file.name.rank, rank_file.name.world_size)
    return RankFile(name=name, nodes=nodes, mode=MODE_SCALE, mod_list=list(rank_file.mod_list))


def _measured_weight_scale(module: str, leaf, method: ScaleMethod, device: DeviceScales):
    if method.weight.granularity != "pcs":
        return scale_from_maxabs(leaf_max(leaf), method.weight, device)
    if not isinstance(leaf, list) or len(leaf) < 2:
        raise ConfigError(f"'{method.name}' needs per-channel weight ranges but node '{module}' has one value",
                          fix="pass --weights MODEL_DIR so weight scales come from the weights themselves.")
    return [scale_from_maxabs(leaf_max(row), method.weight, device) for row in leaf]


def write_scale_files(in_dir: Path, out_dir: Path, method: ScaleMethod, device: DeviceScales,
                      weight_scale: WeightScale | None = None) -> ScaleRun:
    """Scale files for every rank of the run in `in_dir`, written next to nothing else in `out_dir`."""
    measurements = MeasurementSet.discover(in_dir)
    run = ScaleRun(in_dir=Path(in_dir), out_dir=Path(out_dir), method=method, device=device)
    for index in range(len(measurements.names)):
        scaled = scale_rank_file(measurements.read(index), method, device, weight_scale, run)
        write_rank_file(scaled, out_dir)
        run.ranks += 1
        run.nodes = len(scaled.nodes)
    return run


def make_scales(in_dir: Path, out_dir: Path, method_name: str | None, device: str | None, *,
                device_for: str | None = None, weights_dir: Path | None = None, input_backoff: float | None = None,
                weight_backoff: float | None = None) -> ScaleRun:
    """`ray-calib scales`: resolve method and device (default: the sidecar's device), then write the files."""
    from ray_calib.scales.devices import default_method, device_for_scales
    from ray_calib.scales.methods import check_method_for_device, get_method

    meta = MeasurementSet.discover(in_dir).meta
    device = device or (meta.device_type if meta and meta.device_type else None)
    if device is None:
        raise ConfigError(f"{in_dir}: no ray_calib_meta.json says which device measured this",
                          fix="pass --device gaudi2|gaudi3|cuda|cpu.")
    method = get_method(method_name or default_method(device), input_backoff=input_backoff,
                        weight_backoff=weight_backoff)
    scales_device = device_for_scales(device, device_for, method.name)
    check_method_for_device(method, scales_device)
    weight_scale = checkpoint_weight_scales(weights_dir, method, scales_device) if weights_dir else None
    return write_scale_files(in_dir, out_dir, method, scales_device, weight_scale)


def checkpoint_weight_scales(weights_dir: Path, method: ScaleMethod, device: DeviceScales) -> WeightScale:
    """Weight scales from the checkpoint's full tensors (a fused module's parts share one per-tensor scale).

    Ranks of a TP run get the full tensor's scale, which covers every shard; INC would use the shard's.
    """
    from ray_calib.convert import names
    from ray_calib.convert.checkpoint import Checkpoint
    from ray_calib.convert.safetensors_io import ShardReader
    from ray_calib.scales.methods import WeightScaleSearch, channel_scales

    checkpoint = Checkpoint.open(weights_dir)
    cache: dict[str, float | list[float] | None] = {}

    def scale(module: str):
        if module not in cache:
            members = [f"{p}.weight" for p in names.checkpoint_modules(module)]
            if not all(m in checkpoint.tensors for m in members):
                cache[module] = None
                return None
            search, rows = WeightScaleSearch(method, device), []
            for member in members:
                with ShardReader(checkpoint.path / checkpoint.shard_of[member]) as reader:
                    weight = reader.read(member)
                if method.per_channel_weights:
                    rows += channel_scales(weight, method, device).tolist()
                else:
                    search.add(weight)
            cache[module] = rows if method.per_channel_weights else search.scale()
        return cache[module]

    return scale
