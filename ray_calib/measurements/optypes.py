"""Which INC op type a stats node is, read from its module name and shape; INC's in-memory scale layout.

INC patches module classes (`patching_common._mod_default_dict`) and keys its files by module name, so
the class is not in the file. The name and the measured shape tell it apart:
    kv_cache     k_cache / v_cache / latent_cache_k (VLLMKVCache, KVCache)
    fused_sdpa   fused_scaled_dot_product_attention (ModuleFusedSDPA; 3 inputs, 2 outputs measured)
    softmax      *softmax* (Softmax, BlockSoftmaxConstMax)
    b2b_matmul   batch2block_matmul / block2batch_matmul (B2BMatmul in INC >= 3.8.1, Matmul before)
    matmul       matmul_qk / matmul_av and other *matmul* nodes without weights
    dynamic_moe  the fused MoE op (`<op>` of `<op>.w13_list.K` children, or named moe_op)
    embedding    a weight node named *embed* (EmbeddingBag, INC's CPU QDQ path)
    row_parallel_linear  a weight node with 2 measured outputs (pre- and post-all-reduce max, INC >= 3.4)
    linear       any other weight node
"""

from __future__ import annotations

import re
from typing import Any

LINEAR, ROW_PARALLEL_LINEAR, MATMUL, B2B_MATMUL = "linear", "row_parallel_linear", "matmul", "b2b_matmul"
KV_CACHE, FUSED_SDPA, SOFTMAX, DYNAMIC_MOE, EMBEDDING = "kv_cache", "fused_sdpa", "softmax", "dynamic_moe", "embedding"
OTHER = "other"

_KV_RE = re.compile(r"(?:^|_)[kv]_cache$|_cache_[kv]$")
_FSDPA_RE = re.compile(r"fused_scaled_dot_product_attention|fused_sdpa|fsdpa")
_B2B = ("batch2block_matmul", "block2batch_matmul")


def leaf_name(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def is_kv_cache(module: str) -> bool:
    return bool(_KV_RE.search(leaf_name(module)))


def op_type(module: str, node: dict[str, Any], moe_ops: frozenset[str] = frozenset()) -> str:
    """INC's op type of a range (or scale) node; `moe_ops` are the fused MoE ops of the file."""
    leaf = leaf_name(module)
    has_weight = "weight" in node.get("params", {})
    if module in moe_ops or leaf == "moe_op":
        return DYNAMIC_MOE
    if is_kv_cache(module):
        return KV_CACHE
    if _FSDPA_RE.search(leaf):
        return FUSED_SDPA
    if "softmax" in leaf:
        return SOFTMAX
    if has_weight:
        if "embed" in leaf:
            return EMBEDDING
        return ROW_PARALLEL_LINEAR if len(node.get("outputs", ())) == 2 else LINEAR
    if leaf in _B2B:
        return B2B_MATMUL
    if "matmul" in leaf:
        return MATMUL
    return OTHER


def inc_scale_layout(module: str, node: dict[str, Any]) -> dict[str, Any]:
    """A scale node with INC's containers, so that its NPZ pickle is INC's byte for byte.

    INC builds `ModuleConfig(inputs, outputs, params)` and saves its `__dict__`: `inputs` a list (`()` when
    empty: softmax, embedding), `outputs` a tuple except KVCacheOpQuantizer's list, `params` a dict whose
    per-channel weight is `{0: out_channels, 1: in_channels}` (int keys; "0"/"1" once through JSON).
    Values are never changed, only containers and key order.
    """
    out: dict[str, Any] = {}
    if "inputs" in node:
        out["inputs"] = list(node["inputs"]) if node["inputs"] else ()
    if "outputs" in node:
        outputs = node["outputs"]
        out["outputs"] = list(outputs) if outputs and is_kv_cache(module) else tuple(outputs)
    if "params" in node:
        out["params"] = {key: _int_keys(leaf) for key, leaf in node["params"].items()}
    return out


def _int_keys(leaf: Any) -> Any:
    if isinstance(leaf, dict) and all(str(key).isdigit() for key in leaf):
        return {int(key): _int_keys(value) for key, value in leaf.items()}
    return leaf
