"""A copy of a tiny model that computes the same function with its sums in another order.

Hidden units, MLP/expert intermediate units, attention heads and the MLA q/kv LoRA ranks are permuted
consistently: every weight that writes a unit and every weight (or norm) that reads it. In exact
arithmetic nothing changes. In bf16, every GEMM contracting over a permuted dimension adds its terms in
another order, and every row-parallel layer's ranks hold other slices of its sum, so each rank's
partial output rounds differently before the all-reduce -- the same mechanism that makes measurements
at two TP sizes differ. Max-abs ranges are per tensor (or per expert; experts are not permuted), so the
permuted model has the same node names, the same weight ranges and, up to rounding, the same
activation ranges. RoPE pairs stay inside their heads (head_dim is never permuted).

Dimensions that tensor parallelism shards (heads, MLP and expert intermediate units) are permuted only
inside each of `blocks` equal blocks: at TP=`blocks` every rank then holds the same units as in the
original model (its per-rank ranges are comparable, rank by rank), while at a larger TP the units move
between ranks, so the partial sums there are made of other units. Heads are reversed inside each block,
so every head changes rank at TP=2*blocks.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

SEED = 1234


def permuted_copy(model: Path, out: Path, seed: int = SEED, blocks: int = 2) -> Path:
    from safetensors.torch import load_file, save_file

    config = json.loads((model / "config.json").read_text())
    assert config.get("num_key_value_heads", config["num_attention_heads"]) == config["num_attention_heads"], (
        "grouped KV heads would need their query groups moved with them"
    )
    generator = torch.Generator().manual_seed(seed)
    perms: dict[str, torch.Tensor] = {}

    def perm(key: str, size: int) -> torch.Tensor:
        """Free for replicated dims (hidden, LoRA ranks); inside each block for sharded ones (inter:*)."""
        if key not in perms:
            if key.startswith("inter:"):
                block = size // blocks
                perms[key] = torch.cat([b * block + torch.randperm(block, generator=generator) for b in range(blocks)])
            else:
                perms[key] = torch.randperm(size, generator=generator)
        return perms[key]

    hidden = perm("hidden", config["hidden_size"])
    per_block = config["num_attention_heads"] // blocks
    heads = torch.cat([torch.arange(b * per_block, (b + 1) * per_block).flip(0) for b in range(blocks)])
    tensors = load_file(model / "model.safetensors")
    result = {}
    for name, weight in tensors.items():
        result[name] = _permute(name, weight, config, hidden, heads, perm).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    for side in model.iterdir():
        if side.is_file() and side.suffix != ".safetensors":
            shutil.copy(side, out / side.name)
    save_file(result, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _permute(name: str, w: torch.Tensor, config: dict, hidden, heads, perm) -> torch.Tensor:
    layer = re.search(r"layers\.(\d+)\.", name)
    scope = name.rsplit(".", 2)[0]  # the module holding this weight: its own intermediate permutation
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    if name.endswith(("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight")):
        return w[:, hidden]  # reads the hidden state (the router too)
    if name.endswith(("layernorm.weight", "model.norm.weight")) and "kv_a_" not in name and "q_a_" not in name:
        return w[hidden]
    if name.endswith(("gate_proj.weight", "up_proj.weight")):  # rows: intermediate units; columns: hidden
        return w[perm(f"inter:{scope}", w.shape[0])][:, hidden]
    if name.endswith("down_proj.weight"):
        return w[hidden][:, perm(f"inter:{scope}", w.shape[1])]
    if layer is None:
        return w
    attn = f"model.layers.{layer[1]}.self_attn"
    if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")):
        return _head_rows(w, heads, w.shape[0] // len(heads))[:, hidden]
    if name.endswith("self_attn.o_proj.weight"):
        v_dim = config.get("v_head_dim", head_dim)
        return _head_cols(w[hidden], heads, v_dim)
    if name.endswith("q_a_proj.weight"):
        return w[perm(f"q_lora:{attn}", w.shape[0])][:, hidden]
    if name.endswith("q_a_layernorm.weight"):
        return w[perm(f"q_lora:{attn}", w.shape[0])]
    if name.endswith("q_b_proj.weight"):
        rows = _head_rows(w, heads, w.shape[0] // len(heads))
        return rows[:, perm(f"q_lora:{attn}", w.shape[1])]
    if name.endswith("kv_a_proj_with_mqa.weight"):  # rows: [latent (kv_lora_rank) | k_pe (rope, left alone)]
        lora = config["kv_lora_rank"]
        order = torch.cat([perm(f"kv_lora:{attn}", lora), torch.arange(lora, w.shape[0])])
        return w[order][:, hidden]
    if name.endswith("kv_a_layernorm.weight"):
        return w[perm(f"kv_lora:{attn}", w.shape[0])]
    if name.endswith("kv_b_proj.weight"):  # rows: per head [k_nope | v]; columns: the latent
        rows = _head_rows(w, heads, w.shape[0] // len(heads))
        return rows[:, perm(f"kv_lora:{attn}", w.shape[1])]
    return w


def _head_rows(w: torch.Tensor, heads: torch.Tensor, per_head: int) -> torch.Tensor:
    return w.view(len(heads), per_head, -1)[heads].reshape(w.shape)


def _head_cols(w: torch.Tensor, heads: torch.Tensor, per_head: int) -> torch.Tensor:
    return w.view(w.shape[0], len(heads), per_head)[:, heads].reshape(w.shape)
