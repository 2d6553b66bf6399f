"""Measurement sets named like vLLM's module tree, generated from a real checkpoint's tensor names.

`ray-calib measure` writes ranges keyed by vLLM module names (fused `qkv_proj`, `gate_up_proj`,
`fused_qkv_a_proj`, MoE op `mlp.experts` with children `w13_list.K` / `w2_list.K`, attention `attn` /
`mla_attn` nodes with inputs (q, k, v)). These helpers produce exactly that shape from the tiny
model's checkpoint so quantize can be tested without running a measurement.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from ray_calib.inc import RankFile, RunMeta, StatsName, write_meta, write_rank_file
from ray_calib.model.checkpoint import Checkpoint
from ray_calib.model.safetensors_io import ShardReader

PREFIX = "inc_measure_output"
_EXPERT = re.compile(r"^(?P<op>.+\.experts)\.(?P<e>\d+)\.(?P<part>gate_proj|up_proj|down_proj)$")
_FUSE = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
    "q_a_proj": "fused_qkv_a_proj",
    "kv_a_proj_with_mqa": "fused_qkv_a_proj",
}


def vllm_module(prefix: str) -> str:
    match = _EXPERT.match(prefix)
    if match:
        kind = "w2_list" if match["part"] == "down_proj" else "w13_list"
        return f"{match['op']}.{kind}.{match['e']}"
    head, _, leaf = prefix.rpartition(".")
    return f"{head}.{_FUSE.get(leaf, leaf)}"


def measurement_nodes(model_dir: Path, *, seed: int = 0, weights: bool = True) -> dict:
    """Nodes for every linear weight of the checkpoint, plus MoE ops and attention (KV) nodes."""
    from ray_calib.model import names

    rng = random.Random(seed)
    leaf = lambda: [[round(rng.uniform(0.05, 8.0), 4)]]  # noqa: E731
    checkpoint = Checkpoint.open(model_dir)
    nodes: dict = {}
    experts: dict[str, int] = {}
    for name, info in checkpoint.tensors.items():
        if not names.is_linear_weight(name, len(info.shape)):
            continue
        prefix = name.removesuffix(".weight")
        module = vllm_module(prefix)
        node = nodes.setdefault(module, {"inputs": [leaf()], "params": {"weight": [[0.0]]}})
        if weights:
            with ShardReader(model_dir / checkpoint.shard_of[name]) as reader:
                amax = float(reader.read(name).abs().max().float())
            node["params"]["weight"] = [[max(node["params"]["weight"][0][0], amax)]]
        match = _EXPERT.match(prefix)
        if match:
            node["inputs"] = [[[0.0]]]  # INC's dummy input on expert children
            experts[match["op"]] = max(experts.get(match["op"], 0), int(match["e"]) + 1)
    for op, count in experts.items():
        nodes[op] = {"inputs": [leaf()], "outputs": [leaf()] + [leaf() for _ in range(count)]}
    layers = {m.rpartition(".self_attn")[0] for m in nodes if ".self_attn." in m}
    mla = "deepseek" in checkpoint.model_type
    for layer in sorted(layers):
        attn = f"{layer}.self_attn.mla_attn" if mla else f"{layer}.self_attn.attn"
        nodes[attn] = {"inputs": [leaf(), leaf(), leaf()]}
    return nodes


def write_measurements(
    directory: Path, model_dir: Path, *, world_size: int = 1, seed: int = 0, device_type: str = "cpu"
) -> list[RankFile]:
    """A complete set of `world_size` rank files (sharded ranks get smaller ranges) and a meta sidecar."""
    directory.mkdir(parents=True, exist_ok=True)
    base = measurement_nodes(model_dir, seed=seed)
    files = []
    for rank in range(world_size):
        nodes = _shrink(base, rank, world_size)
        name = StatsName(
            PREFIX, rank=rank if world_size > 1 else None, world_size=world_size if world_size > 1 else None
        )
        rank_file = RankFile(name=name, nodes=nodes, mod_list=list(nodes))
        write_rank_file(rank_file, directory)
        files.append(rank_file)
    write_meta(
        directory,
        RunMeta(
            device_type=device_type, model=str(model_dir), tp_size=world_size, observer="maxabs", fp8_kv=True, ep_size=1
        ),
    )
    return files


def _shrink(nodes: dict, rank: int, world_size: int) -> dict:
    """Rank r of N holds the full range on rank 0 and a fraction elsewhere: unify's max gives `nodes` back."""
    factor = 1.0 if rank == 0 else 1.0 - 0.5 * rank / world_size

    def scaled(value):
        if isinstance(value, list):
            return [scaled(v) for v in value]
        return value * factor

    return {
        module: {
            key: (scaled(v) if key != "params" else {k: scaled(w) for k, w in v.items()}) for key, v in node.items()
        }
        for module, node in nodes.items()
    }
