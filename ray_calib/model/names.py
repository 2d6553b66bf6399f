"""vLLM module names (what measurements are keyed by) <-> checkpoint tensor names (what we rewrite).

vLLM fuses projections that read the same input; the checkpoint keeps them apart:
    <p>.qkv_proj                 -> <p>.q_proj, <p>.k_proj, <p>.v_proj
    <p>.gate_up_proj             -> <p>.gate_proj, <p>.up_proj
    <p>.fused_qkv_a_proj         -> <p>.q_a_proj, <p>.kv_a_proj_with_mqa          (DeepSeek MLA)
    <p>.experts.w13_list.K       -> <p>.experts.K.gate_proj, <p>.experts.K.up_proj (fused MoE op children)
    <p>.experts.w2_list.K        -> <p>.experts.K.down_proj
A fused group shares one input scale and (per tensor) one weight scale, as vLLM requires for a fused
layer. KV-cache ranges come from attention nodes (vLLM `Attention`/`MLAAttention` inputs, or INC's
`k_cache`/`v_cache`/`latent_cache_k`) and become `<layer>.self_attn.{k,v}_proj.{k,v}_scale`, the name
vLLM's loader maps onto `attn.k_scale` (and onto MLA's latent cache scale for DeepSeek).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

_EXPERT_CHILD_RE = re.compile(r"^(.+)\.(w13_list|w2_list)\.(\d+)$")


@functools.lru_cache(maxsize=1 << 16)
def expert_child(module: str) -> tuple[str, str, int] | None:
    """`(op, kind, expert)` for `<op>.w13_list.K` / `<op>.w2_list.K`, else None (cached: names repeat per rank)."""
    match = _EXPERT_CHILD_RE.match(module)
    return (match[1], match[2], int(match[3])) if match else None


_FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa"),
}
_EXPERT_CKPT = {"w13_list": ("gate_proj", "up_proj"), "w2_list": ("down_proj",)}

# Checkpoint weights that stay in BF16: the output head, embeddings, norms and MoE routers.
KEEP_PATTERNS = (
    r"(^|\.)lm_head\.",
    r"embed_tokens\.",
    r"norm\.weight$",
    r"(^|\.)mlp\.gate\.",
    r"e_score_correction_bias$",
    r"\.bias$",
)
_KEEP_RE = re.compile("|".join(KEEP_PATTERNS))
KEEP_MODULES = ("lm_head", r"re:.*mlp\.gate$")  # the same, as compressed-tensors `ignore` entries

_KV_NODE_RE = re.compile(
    r"^(?P<attn>.+\.self_attn)\.(?P<rest>attn|mla_attn|mla_attn\.mla_attn|"
    r"(?:mla_)?attn\.impl\.(?:k_cache|v_cache|latent_cache_k))$"
)


def checkpoint_modules(module: str) -> list[str]:
    """Checkpoint module prefixes (tensor name minus `.weight`) behind one vLLM module name."""
    child = expert_child(module)
    if child:
        op, kind, expert = child
        return [f"{op}.{expert}.{part}" for part in _EXPERT_CKPT[kind]]
    head, _, leaf = module.rpartition(".")
    if leaf in _FUSED:
        return [f"{head}.{part}" for part in _FUSED[leaf]]
    return [module]


def vllm_modules(module: str) -> list[str]:
    """The vLLM module names a checkpoint module may live in: its fused group's first, then its own name."""
    head, _, leaf = module.rpartition(".")
    fused = [f"{head}.{name}" if head else name for name, parts in _FUSED.items() if leaf in parts]
    return [*fused, module]


def keeps_bf16(tensor_name: str) -> bool:
    return bool(_KEEP_RE.search(tensor_name))


def is_linear_weight(tensor_name: str, ndim: int) -> bool:
    """A 2-D `.weight` that is not kept in BF16: the tensors quantize must find a measurement for."""
    return ndim == 2 and tensor_name.endswith(".weight") and not keeps_bf16(tensor_name)


@dataclass(frozen=True)
class KvNode:
    layer: str  # e.g. model.layers.3.self_attn
    role: str  # "kv" (vLLM attention: inputs q, k, v or q, kv_c, k_pe), "k", "v" or "latent"


def kv_node(module: str) -> KvNode | None:
    match = _KV_NODE_RE.match(module)
    if not match:
        return None
    rest = match["rest"]
    role = (
        "k"
        if rest.endswith("k_cache") and "latent" not in rest
        else "v"
        if rest.endswith("v_cache")
        else "latent"
        if rest.endswith("latent_cache_k")
        else "kv"
    )
    return KvNode(match["attn"], role)


def kv_scale_names(layer: str) -> tuple[str, str]:
    return f"{layer}.k_proj.k_scale", f"{layer}.v_proj.v_scale"
