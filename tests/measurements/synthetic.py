"""Small generated measurement sets shaped like INC's, for tests that must not depend on the real INC files."""

from __future__ import annotations

import random
from pathlib import Path

from ray_calib.inc import RankFile, StatsName, write_rank_file

PREFIX = "inc_measure_output"


def rank_nodes(rng: random.Random, *, layers: int = 2, experts: int = 0, moe_outputs: bool = True) -> dict:
    """One rank's nodes: linear layers, a row-parallel layer with 2 outputs, optional EP MoE layout."""
    value = lambda: [[round(rng.uniform(0.01, 10.0), 4)]]  # noqa: E731 (a leaf like INC's [[v]])
    nodes: dict = {}
    for layer in range(layers):
        base = f"model.layers.{layer}"
        nodes[f"{base}.self_attn.qkv_proj"] = {"inputs": [value()], "params": {"weight": value()}}
        nodes[f"{base}.self_attn.o_proj"] = {
            "inputs": [value()],
            "outputs": [value(), value()],
            "params": {"weight": [[rng.uniform(0, 1)], [rng.uniform(0, 1)]]},
        }
        if experts:
            op = f"{base}.mlp.experts.moe_op"
            nodes[op] = {"inputs": [value()], "outputs": [value()] + [value() for _ in range(experts)]}
            for kind in ("w13_list", "w2_list"):
                for expert in range(experts):
                    nodes[f"{op}.{kind}.{expert}"] = {"inputs": [[[0.0]]], "params": {"weight": value()}}
    return nodes


def write_set(
    directory: Path, world_size: int, *, seed: int = 0, experts: int = 0, layers: int = 2, prefix: str = PREFIX
) -> list[RankFile]:
    rng = random.Random(seed)
    files = []
    for rank in range(world_size):
        nodes = rank_nodes(rng, layers=layers, experts=experts)
        rank_file = RankFile(
            name=StatsName(prefix, rank=rank, world_size=world_size),
            nodes=nodes,
            mod_list=list(nodes) + ["model.layers.0.mlp.experts"],
        )
        write_rank_file(rank_file, directory)
        files.append(rank_file)
    return files
