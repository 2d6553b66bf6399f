"""Post-processing of INC's Gaudi measurements before scales are made from them.

INC measures each attention piece where it runs, but prefill and decode read the KV cache through
different ops, so the ranges that must agree can differ:

- `matmul_qk` reads K from the cache: its second input takes the range of what was written into the K
  cache (`k_cache` input). `matmul_av` reads V: its second input takes the `v_cache` input. With MLA
  (DeepSeek) one latent cache holds both, so both take the `latent_cache_k` input.
- the fused SDPA output feeds `o_proj` directly: its output range takes `o_proj`'s input range
  ("otherwise the accuracy may drop").

Attention modules are found by their `.impl.` children, whatever the vLLM build calls the attention
(`attn`, `mla_attn`, `mla_attn.mla_attn`). INC's QUANTIZE reads only the NPZ: callers write the fixed
rank files back with `write_rank_file`, which rewrites JSON, NPZ and mod_list together.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from ray_calib.inc.rankfile import MODE_RANGE, RankFile

_ATTN_PIECE = re.compile(
    r"^(model\.layers\.\d+\.self_attn)\.(.+)\.impl\.(matmul_qk|matmul_av|k_cache|v_cache|"
    r"latent_cache_k|fused_scaled_dot_product_attention)$"
)
_O_PROJ = ("o_proj", "out_proj", "c_proj")  # Llama/DeepSeek, OPT, Qwen


@dataclass
class PostprocessReport:
    attention_layers: int = 0
    mla: bool = False
    matmul_inputs_fixed: int = 0  # matmul_qk/matmul_av second inputs replaced by the cache input
    fsdpa_outputs_fixed: int = 0  # fused SDPA outputs replaced by the o_proj input
    changed: list[str] = field(default_factory=list)


def postprocess(rank_file: RankFile) -> tuple[RankFile, PostprocessReport]:
    """The rank file with cache-read matmuls and SDPA outputs aligned; range files only (scales pass as they are)."""
    report = PostprocessReport()
    if rank_file.mode != MODE_RANGE:
        return rank_file, report
    nodes = copy.deepcopy(rank_file.nodes)
    for (block, _attn), pieces in sorted(_attention_pieces(nodes).items()):
        report.attention_layers += 1
        mla = "latent_cache_k" in pieces
        report.mla |= mla
        k_cache = pieces.get("latent_cache_k" if mla else "k_cache")
        v_cache = pieces.get("latent_cache_k" if mla else "v_cache")
        for matmul, cache in (("matmul_qk", k_cache), ("matmul_av", v_cache)):
            if _set_leaf(nodes, pieces.get(matmul), "inputs", 1, nodes, cache, "inputs", 0):
                report.matmul_inputs_fixed += 1
                report.changed.append(pieces[matmul])
        o_proj = next((f"{block}.{name}" for name in _O_PROJ if f"{block}.{name}" in nodes), None)
        fsdpa = pieces.get("fused_scaled_dot_product_attention")
        # MLA: no upstream step 3 applies this rule. vllm-gaudi's own has only the cache rule, and with its names
        # (o_proj shared at self_attn.o_proj) the o_proj input also covers the decode path after W_UV.
        if fsdpa and o_proj and not mla and _set_first_value(nodes[fsdpa], "outputs", nodes[o_proj], "inputs"):
            report.fsdpa_outputs_fixed += 1
            report.changed.append(fsdpa)
    fixed = RankFile(
        name=rank_file.name,
        nodes=nodes,
        mode=rank_file.mode,
        mod_list=list(rank_file.mod_list),
        extra=dict(rank_file.extra),
    )
    return fixed, report


def _attention_pieces(nodes: dict) -> dict[tuple[str, str], dict[str, str]]:
    """(self_attn block, attention path) -> piece name -> full module name."""
    found: dict[tuple[str, str], dict[str, str]] = {}
    for module in nodes:
        match = _ATTN_PIECE.match(module)
        if match:
            found.setdefault((match[1], match[2]), {})[match[3]] = module
    return found


def _set_leaf(
    nodes: dict,
    target: str | None,
    field_name: str,
    index: int,
    source_nodes: dict,
    source: str | None,
    source_field: str,
    source_index: int,
) -> bool:
    """nodes[target][field][index] = source_nodes[source][source_field][source_index]; True when it changed."""
    if target is None or source is None:
        return False
    values, reference = nodes[target].get(field_name), source_nodes[source].get(source_field)
    if not values or not reference or len(values) <= index or len(reference) <= source_index:
        return False
    if values[index] == reference[source_index]:
        return False
    values[index] = copy.deepcopy(reference[source_index])
    return True


def _set_first_value(node: dict, field_name: str, source: dict, source_field: str) -> bool:
    """node[field][0] takes the per-tensor value of source[source_field][0] (leaf `[[v]]`)."""
    values, reference = node.get(field_name), source.get(source_field)
    if values is None or reference is None:
        return False
    try:
        new, old = reference[0][0][0], values[0][0][0]
    except (TypeError, IndexError, KeyError):
        return False
    if new == old:
        return False
    values[0][0][0] = new
    return True
