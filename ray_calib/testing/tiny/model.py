"""Tiny random-weight models that vLLM on CPU loads in seconds: the test and demo stand-ins for the real ones.

All keep what makes the real models hard to calibrate, at toy size:
    deepseek_v3  MLA (q/kv LoRA, latent cache), MoE with a shared expert, sigmoid `noaux_tc` routing,
                 dense first layer (`first_k_dense_replace`), 8 routed experts top-2
    deepseek_r1  DeepSeek-R1's routing and head count: 16 heads (TP=16 gives one per rank), 256 routed
                 experts top-8 chosen within 4 of 8 expert groups (n_group 8, topk_group 4), a shared
                 expert, the first 2 of 5 layers dense
    llama        GQA-free MHA (4 query and 4 KV heads), SwiGLU MLP
deepseek_v3 and llama have 4 attention and 4 KV heads so TP=1/2/4 all shard evenly; head_dim 64 (vLLM CPU
attention needs >= 64); MLA keeps the real latent width kv_lora_rank 512 + rope 64 = 576: the only one
vLLM's CPU MLA decode kernel has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_calib import atomic
from ray_calib.errors import OutputExistsError
from ray_calib.testing.tiny.tokenizer import train_tokenizer

ARCHS = ("deepseek_v3", "deepseek_r1", "llama")
VOCAB_SIZE = 1024

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
}
_DEEPSEEK_V3 = {
    **_COMMON,
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "intermediate_size": 512,
    "q_lora_rank": 128,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 64,
    "v_head_dim": 64,
    "head_dim": 64,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "moe_intermediate_size": 256,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "num_nextn_predict_layers": 0,
    "rope_interleave": True,
}

CONFIGS: dict[str, dict[str, Any]] = {
    "deepseek_v3": _DEEPSEEK_V3,
    # DeepSeek-R1's heads and routing at toy size (128 / 16 ranks = 8 experts per rank; vLLM's CPU MoE kernel
    # pads each rank's slice to 32: zeros, no effect)
    "deepseek_r1": {
        **_DEEPSEEK_V3,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_hidden_layers": 5,
        "first_k_dense_replace": 2,
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 128,
        "n_group": 8,
        "topk_group": 4,
    },
    "llama": {
        **_COMMON,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 4,
        "intermediate_size": 512,
        "head_dim": 64,
        "hidden_act": "silu",
    },
}


@dataclass(frozen=True)
class TinyModel:
    path: Path
    arch: str
    num_parameters: int
    num_layers: int
    num_experts: int  # routed experts per MoE layer (0 for llama)
    size_bytes: int


def make_tiny_model(arch: str, out: str | os.PathLike, *, seed: int = 0, force: bool = False) -> TinyModel:
    """Build a random-weight `arch` model plus a freshly trained tokenizer in `out` (bf16 safetensors).

    Same `seed`, same bytes: tests and the demo can rebuild it instead of shipping weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    out = Path(out)
    _check_out(out, force)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(**CONFIGS[arch])
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if arch.startswith("deepseek"):
        _spread_router_bias(model, seed)
    tokenizer = train_tokenizer(VOCAB_SIZE, seed=seed)
    with atomic.staged_dir(out) as stage:
        model.save_pretrained(str(stage))
        tokenizer.save_pretrained(str(stage))
        GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, do_sample=False).save_pretrained(str(stage))
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return TinyModel(
        path=out,
        arch=arch,
        num_parameters=sum(p.numel() for p in model.parameters()),
        num_layers=config.num_hidden_layers,
        num_experts=getattr(config, "n_routed_experts", 0),
        size_bytes=size,
    )


def _spread_router_bias(model, seed: int) -> None:
    """Give the routers' `e_score_correction_bias` a small random spread (zeros in a fresh model).

    Real checkpoints carry a trained bias; a non-zero one makes sure the loader and the router's bias
    path are exercised, while staying small enough that every expert still gets tokens.
    """
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    for name, param in model.named_parameters():
        if name.endswith("e_score_correction_bias"):
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn(buf.shape, generator=generator) * 0.01)


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out} is not empty", fix="choose another --out or pass --force to overwrite it.")
