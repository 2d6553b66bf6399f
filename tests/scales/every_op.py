"""A TP1 range file holding one node of every INC op type, the checkpoint behind its weights, and the
module each node stands for (INC class name, weight tensor) so INC's own op quantizers can be run on it.

Values are chosen to hit INC's bf16 arithmetic where it matters: maxabs values that land a hair above
a power-of-two boundary (ratio 1 + k/256) next to ordinary random ones, and zeros (an unrouted expert,
the MoE children's dummy input).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ray_calib.inc import RankFile, StatsName, write_rank_file

PREFIX = "inc_output"
ATTN = "model.layers.{i}.self_attn"
IMPL = ATTN + ".attn.impl"
MOE = "model.layers.{i}.mlp.experts"
EXPERTS = 4
HIDDEN, INTER, HEADS, HEAD_DIM = 64, 96, 4, 16


@dataclass
class EveryOp:
    range_dir: Path
    model_dir: Path
    modules: dict[str, tuple[str, str, object]] = field(default_factory=dict)  # name -> (INC class, op type, weight)


def _value(rng: random.Random) -> float:
    """A bf16-exact positive maxabs: boundary-hugging (2^e * 1.0039..1.0156) or ordinary."""
    import math

    if rng.random() < 0.5:
        base = 2.0 ** rng.randint(-12, 8)
        for fullscale_backoff in (112.0, 60.0, 224.0, 120.0):
            if rng.random() < 0.25:
                base *= fullscale_backoff / 2.0 ** round(math.log2(fullscale_backoff))
        return _bf16(base * (1 + rng.randint(1, 4) / 256))
    return _bf16(rng.uniform(0.001, 300.0))


def _bf16(x: float) -> float:
    from ray_calib.inc.arith import bf16

    return bf16(x)


def build(root: Path, *, layers: int = 6, seed: int = 0) -> EveryOp:
    import torch
    from safetensors.torch import save_file

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    leaf = lambda: [[_value(rng)]]  # noqa: E731
    tensors: dict[str, torch.Tensor] = {}
    nodes: dict = {}
    built = EveryOp(range_dir=root / "measure", model_dir=root / "model")

    def weight(name: str, rows: int, cols: int) -> torch.Tensor:
        scale = _value(rng) / 3.0
        tensor = (torch.randn(rows, cols, generator=gen) * scale).to(torch.bfloat16)
        tensors[name] = tensor
        return tensor

    def linear(module: str, cls: str, parts: list[tuple[str, int]], cols: int, node: dict) -> None:
        fused = torch.cat([weight(f"{p}.weight", rows, cols) for p, rows in parts])
        node["params"] = {"weight": [[float(fused.abs().max().float())]]}
        nodes[module] = node
        built.modules[module] = (cls, "row_parallel_linear" if cls == "RowParallelLinear" else "linear", fused)

    for i in range(layers):
        attn, impl = ATTN.format(i=i), IMPL.format(i=i)
        linear(
            f"{attn}.qkv_proj",
            "QKVParallelLinear",
            [(f"{attn}.q_proj", HEADS * HEAD_DIM), (f"{attn}.k_proj", HEAD_DIM), (f"{attn}.v_proj", HEAD_DIM)],
            HIDDEN,
            {"inputs": [leaf()]},
        )
        linear(
            f"{attn}.o_proj",
            "RowParallelLinear",
            [(f"{attn}.o_proj", HIDDEN)],
            HEADS * HEAD_DIM,
            {"inputs": [leaf()], "outputs": [leaf(), leaf()]},
        )
        for name, cls, kind, node in (
            ("matmul_qk", "Matmul", "matmul", {"inputs": [leaf(), leaf()]}),
            ("matmul_av", "Matmul", "matmul", {"inputs": [leaf(), leaf()]}),
            ("batch2block_matmul", "B2BMatmul", "b2b_matmul", {"inputs": [[[1.0]], leaf()], "outputs": [leaf()]}),
            ("block2batch_matmul", "B2BMatmul", "b2b_matmul", {"inputs": [[[1.0]], leaf()], "outputs": [leaf()]}),
            ("k_cache", "VLLMKVCache", "kv_cache", {"inputs": [leaf()]}),
            ("v_cache", "VLLMKVCache", "kv_cache", {"inputs": [leaf()]}),
            (
                "fused_scaled_dot_product_attention",
                "ModuleFusedSDPA",
                "fused_sdpa",
                {"inputs": [leaf(), leaf(), leaf()], "outputs": [leaf(), leaf()]},
            ),
            ("softmax", "BlockSoftmaxConstMax", "softmax", {"inputs": [leaf()], "outputs": [leaf()]}),
        ):
            nodes[f"{impl}.{name}"] = node
            built.modules[f"{impl}.{name}"] = (cls, kind, None)
        mlp = f"model.layers.{i}.mlp"
        if i % 2 == 0:
            linear(
                f"{mlp}.gate_up_proj",
                "MergedColumnParallelLinear",
                [(f"{mlp}.gate_proj", INTER), (f"{mlp}.up_proj", INTER)],
                HIDDEN,
                {"inputs": [leaf()]},
            )
            linear(
                f"{mlp}.down_proj",
                "RowParallelLinear",
                [(f"{mlp}.down_proj", HIDDEN)],
                INTER,
                {"inputs": [leaf()], "outputs": [leaf(), leaf()]},
            )
            continue
        op = MOE.format(i=i)
        per_expert = [leaf() for _ in range(EXPERTS)]
        per_expert[1] = [[0.0]]  # an expert no token reached
        nodes[op] = {"inputs": [leaf()], "outputs": [leaf()] + per_expert}
        built.modules[op] = ("VllmMixtureOfExpertsOp", "dynamic_moe", None)
        for expert in range(EXPERTS):
            linear(
                f"{op}.w13_list.{expert}",
                "MoeMatmul",
                [(f"{op}.{expert}.gate_proj", INTER), (f"{op}.{expert}.up_proj", INTER)],
                HIDDEN,
                {"inputs": [[[0.0]]]},
            )
            linear(
                f"{op}.w2_list.{expert}",
                "MoeMatmul",
                [(f"{op}.{expert}.down_proj", HIDDEN)],
                INTER,
                {"inputs": [[[0.0]]]},
            )
    linear("model.embed_bag", "EmbeddingBag", [("model.embed_bag", 32)], HIDDEN, {"inputs": [leaf()]})
    built.modules["model.embed_bag"] = ("EmbeddingBag", "embedding", built.modules["model.embed_bag"][2])
    built.model_dir.mkdir(parents=True)
    save_file(tensors, str(built.model_dir / "model.safetensors"))
    (built.model_dir / "config.json").write_text(
        f'{{"model_type": "llama", "num_attention_heads": {HEADS}, "num_key_value_heads": 1, "hidden_size": {HIDDEN}}}'
    )
    write_rank_file(RankFile(name=StatsName(PREFIX, rank=0, world_size=1), nodes=nodes), built.range_dir)
    return built
