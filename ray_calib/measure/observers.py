"""Maxabs observers installed on a vLLM model inside one worker (one TP rank).

What is recorded, per node name (the vLLM module path), in INC's layout (DESIGN §3):

    linear layer         inputs [x]; params.weight (this rank's shard, taken before the CPU repack)
    RowParallelLinear    outputs [pre-reduce partial output of this rank, post-reduce output]
    <moe runner>         the fused MoE op: inputs [hidden], outputs [routed output (pre-reduce),
                         amax of the intermediate act(x W13^T) of expert 0..E-1]
    <moe>.w13_list.K     inputs [tokens routed to expert K], params.weight = max |W13[K]|
    <moe>.w2_list.K      inputs [expert K's intermediate], params.weight = max |W2[K]|
    <attn>.impl.k_cache / .impl.v_cache     (--fp8-kv) K and V as written to the cache (MHA/GQA)
    <mla>.impl.latent_cache_k               (--fp8-kv) [kv_c_normed | k_pe], the MLA latent cache

Observers only accumulate (running max, token counts); merging across ranks/chunks and turning
ranges into scales happen elsewhere. Each statistic is a 0-d float32 tensor updated in place, so the
hot path is one reduction per tensor and no host sync until `collect`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ray_calib.engine.weights import EXPERT_WEIGHTS_ATTR, WEIGHT_AMAX_ATTR
from ray_calib.scales.quant_config import KV_TYPES  # INC's KV module types, as QUANT_CONFIG names them

_DENSE_ELEMENTS = 1 << 22  # tokens x experts x 2I up to this: one GEMM over all experts beats a loop


def _amax(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.detach(), ord=float("inf")).float()


class MaxAbs:
    """Running max |x| of one tensor slot."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def update(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return
        self.update_amax(_amax(t))

    def update_amax(self, amax: torch.Tensor) -> None:
        if self.value is None:
            self.value = amax.clone()
        else:
            torch.maximum(self.value, amax, out=self.value)

    def get(self) -> float:
        return 0.0 if self.value is None else float(self.value)


@dataclass
class NodeStats:
    inputs: list[MaxAbs]
    outputs: list[MaxAbs] = field(default_factory=list)
    weight: float | None = None
    called: bool = False

    def to_node(self) -> dict[str, Any]:
        node: dict[str, Any] = {"inputs": [[[m.get()]] for m in self.inputs]}
        if self.outputs:
            node["outputs"] = [[[m.get()]] for m in self.outputs]
        if self.weight is not None:
            node["params"] = {"weight": [[self.weight]]}
        return node

    def reset(self) -> None:
        for m in (*self.inputs, *self.outputs):
            m.value = None
        self.called = False


@dataclass
class Blocklist:
    """QUANT_CONFIG's blocklist: names are regexes (re.search), types are module class names."""

    names: tuple[str, ...] = ()
    types: tuple[str, ...] = ()

    def blocks(self, name: str, type_name: str = "") -> bool:
        return type_name in self.types or any(re.search(p, name) for p in self.names)


class MoEStats:
    """The fused op, its per-expert children and the per-expert token counts of one MoE layer."""

    def __init__(self, name: str, layer: torch.nn.Module) -> None:
        self.name = name
        self.num_experts = int(layer.local_num_experts)
        self.op = NodeStats(inputs=[MaxAbs()], outputs=[MaxAbs() for _ in range(1 + self.num_experts)])
        self.expert_map = getattr(layer, "expert_map", None)
        w13, w2 = getattr(layer, EXPERT_WEIGHTS_ATTR, (None, None))
        self.w13 = w13
        self.intermediate = w13.shape[1] // 2 if w13 is not None else 0
        self.activation = str(getattr(getattr(layer, "activation", None), "value", "silu"))
        w13_amax = w13.abs().amax(dim=(1, 2)).float().tolist() if w13 is not None else [None] * self.num_experts
        w2_amax = w2.abs().amax(dim=(1, 2)).float().tolist() if w2 is not None else [None] * self.num_experts
        self.w13_nodes = [NodeStats(inputs=[MaxAbs()], weight=w) for w in w13_amax]
        self.w2_nodes = [NodeStats(inputs=[MaxAbs()], weight=w) for w in w2_amax]
        self.counts = torch.zeros(self.num_experts, dtype=torch.int64)
        self.expert_input = torch.zeros(self.num_experts, dtype=torch.float32)
        self.expert_inter = torch.zeros(self.num_experts, dtype=torch.float32)

    def observe(self, x: torch.Tensor, topk_ids: torch.Tensor) -> None:
        self.op.called = True
        self.op.inputs[0].update(x)
        ids = topk_ids.reshape(-1).long()
        if self.expert_map is not None:  # expert parallel: global ids -> this rank's, -1 = elsewhere
            ids = self.expert_map[ids].long()
        tokens = torch.arange(x.shape[0], device=x.device).repeat_interleave(topk_ids.shape[-1])
        local = ids >= 0
        ids, tokens = ids[local], tokens[local]
        self.counts += torch.bincount(ids, minlength=self.num_experts).cpu()
        token_amax = torch.linalg.vector_norm(x.detach(), ord=float("inf"), dim=-1).float()
        self.expert_input.scatter_reduce_(0, ids.cpu(), token_amax[tokens].cpu(), "amax")
        if self.w13 is not None:
            self._observe_intermediate(x, ids, tokens)

    def _observe_intermediate(self, x: torch.Tensor, ids: torch.Tensor, tokens: torch.Tensor) -> None:
        """The routed kernel is fused, so recompute act(x W13^T) for the routed (token, expert) slots.

        Few tokens (decode steps): one GEMM of all tokens against all experts, masked to the routed
        slots -- cheaper than gathering weights. Many (prefill): one GEMM per expert that got tokens,
        over its contiguous slice of the slots sorted by expert.
        """
        if ids.numel() == 0:
            return
        experts, width = self.w13.shape[0], self.w13.shape[1]
        if x.shape[0] * experts * width <= _DENSE_ELEMENTS:
            h = (x @ self.w13.reshape(experts * width, -1).t()).view(x.shape[0], experts, width)
            per_slot = self._act_amax(h)  # [tokens, experts]
            routed = torch.zeros_like(per_slot, dtype=torch.bool)
            routed[tokens, ids] = True
            amax = torch.where(routed, per_slot, torch.zeros_like(per_slot)).amax(dim=0)
            torch.maximum(self.expert_inter, amax.cpu(), out=self.expert_inter)
            return
        order = torch.argsort(ids)
        hit, counts = torch.unique_consecutive(ids[order], return_counts=True)
        start = 0
        for expert, count in zip(hit.tolist(), counts.tolist()):
            rows = tokens[order[start:start + count]]
            start += count
            amax = self._act_amax(x[rows] @ self.w13[expert].t()).max()
            self.expert_inter[expert] = torch.maximum(self.expert_inter[expert], amax.cpu())

    def _act_amax(self, h: torch.Tensor) -> torch.Tensor:
        """Max |act(gate) * up| over the last dim of `h = x W13^T` (gate first, as vLLM loads w13)."""
        gate, up = h[..., :self.intermediate], h[..., self.intermediate:]
        act = torch.nn.functional.gelu(gate) if self.activation.startswith("gelu") else torch.nn.functional.silu(gate)
        return torch.linalg.vector_norm(act * up, ord=float("inf"), dim=-1).float()

    def observe_output(self, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            self.op.outputs[0].update(out)

    def nodes(self) -> dict[str, dict[str, Any]]:
        inter = self.expert_inter.tolist()
        inputs = self.expert_input.tolist()
        for k in range(self.num_experts):
            self.op.outputs[1 + k].update_amax(torch.tensor(inter[k]))
            self.w13_nodes[k].inputs[0].update_amax(torch.tensor(inputs[k]))
            self.w2_nodes[k].inputs[0].update_amax(torch.tensor(inter[k]))
        out = {self.name: self.op.to_node()}
        out.update({f"{self.name}.w13_list.{k}": n.to_node() for k, n in enumerate(self.w13_nodes)})
        out.update({f"{self.name}.w2_list.{k}": n.to_node() for k, n in enumerate(self.w2_nodes)})
        return out

    def child_names(self) -> list[str]:
        return [f"{self.name}.{kind}.{k}" for kind in ("w13_list", "w2_list") for k in range(self.num_experts)]

    def reset(self) -> None:
        self.op.reset()
        for n in (*self.w13_nodes, *self.w2_nodes):
            n.reset()
        self.counts.zero_()
        self.expert_input.zero_()
        self.expert_inter.zero_()


class ModelObserver:
    """Installs hooks on a vLLM model and hands back plain-dict stats for this rank."""

    def __init__(self, model: torch.nn.Module, *, fp8_kv: bool, blocklist: Blocklist) -> None:
        self.model = model
        self.fp8_kv = fp8_kv
        self.blocklist = blocklist
        self.nodes: dict[str, NodeStats] = {}  # in module order
        self.moe: dict[str, MoEStats] = {}
        self.mod_list: list[str] = []
        self.tokens = torch.zeros((), dtype=torch.int64)
        self._handles: list[Any] = []
        self._install()

    # ---- installation ----------------------------------------------------------------------------
    def _install(self) -> None:
        from vllm.model_executor.layers.attention.attention import Attention
        from vllm.model_executor.layers.attention.mla_attention import MLAAttention
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
        from vllm.model_executor.layers.linear import LinearBase, RowParallelLinear
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        seen_methods: set[int] = set()
        counting = False
        for name, module in self.model.named_modules():
            type_name = type(module).__name__
            if not counting and type(module) is VocabParallelEmbedding:  # the input embedding, not lm_head
                self._handles.append(module.register_forward_pre_hook(self._count_tokens))
                counting = True
            if self.blocklist.blocks(name, type_name):
                continue
            if isinstance(module, LinearBase):
                self._install_linear(name, module, isinstance(module, RowParallelLinear), seen_methods)
            elif isinstance(module, MoERunner):
                self._install_moe(name, module)
            elif self.fp8_kv and isinstance(module, (Attention, MLAAttention)):
                self._install_kv(name, module, mla=isinstance(module, MLAAttention))

    def _count_tokens(self, module, args) -> None:
        self.tokens += args[0].numel()

    def _install_linear(self, name: str, module, row_parallel: bool, seen_methods: set[int]) -> None:
        weight = getattr(module, WEIGHT_AMAX_ATTR, None)
        if weight is None and getattr(module, "weight", None) is not None and module.weight.numel():
            weight = _amax(module.weight)
        reduces = row_parallel and getattr(module, "reduce_results", True)
        stats = NodeStats(inputs=[MaxAbs()], outputs=[MaxAbs() for _ in range(2 if reduces else 1)] if row_parallel else [],
                          weight=None if weight is None else float(weight))
        self._add(name, stats)

        def pre_hook(mod, args):
            stats.called = True
            stats.inputs[0].update(args[0])

        self._handles.append(module.register_forward_pre_hook(pre_hook))
        if not row_parallel:
            return
        if id(module.quant_method) in seen_methods:  # a method object shared by layers: give this one its own
            module.quant_method = copy.copy(module.quant_method)
        seen_methods.add(id(module.quant_method))
        module.quant_method.apply = _after(module.quant_method.apply, lambda out: stats.outputs[0].update(out))
        if reduces:
            def hook(mod, args, output):
                stats.outputs[1].update(output[0] if isinstance(output, tuple) else output)

            self._handles.append(module.register_forward_hook(hook))

    def _install_moe(self, name: str, runner) -> None:
        routed = runner.routed_experts
        stats = MoEStats(name, routed)
        self.moe[name] = stats
        self.mod_list.append(name)
        self.mod_list.extend(stats.child_names())
        original = routed.forward_modular

        def forward_modular(x, topk_weights, topk_ids, *args, **kwargs):
            stats.observe(x, topk_ids)
            out = original(x, topk_weights, topk_ids, *args, **kwargs)
            stats.observe_output(out)
            return out

        routed.forward_modular = forward_modular

    def _install_kv(self, name: str, module, *, mla: bool) -> None:
        if set(KV_TYPES) & set(self.blocklist.types):
            return
        if mla:  # forward(q, kv_c_normed, k_pe): the cache row is [kv_c_normed | k_pe]
            latent = NodeStats(inputs=[MaxAbs()])
            self._add(f"{name}.impl.latent_cache_k", latent)

            def mla_hook(mod, args, kwargs):
                kv_c, k_pe = _arg(args, kwargs, 1, "kv_c_normed"), _arg(args, kwargs, 2, "k_pe")
                latent.called = True
                latent.inputs[0].update(kv_c)
                latent.inputs[0].update(k_pe)

            self._handles.append(module.register_forward_pre_hook(mla_hook, with_kwargs=True))
            return
        k_stats, v_stats = NodeStats(inputs=[MaxAbs()]), NodeStats(inputs=[MaxAbs()])
        self._add(f"{name}.impl.k_cache", k_stats)
        self._add(f"{name}.impl.v_cache", v_stats)

        def kv_hook(mod, args, kwargs):
            k_stats.called = v_stats.called = True
            k_stats.inputs[0].update(_arg(args, kwargs, 1, "key"))
            v_stats.inputs[0].update(_arg(args, kwargs, 2, "value"))

        self._handles.append(module.register_forward_pre_hook(kv_hook, with_kwargs=True))

    def _add(self, name: str, stats: NodeStats) -> None:
        self.nodes[name] = stats
        self.mod_list.append(name)

    # ---- results ---------------------------------------------------------------------------------
    def collect(self) -> dict[str, Any]:
        """Nodes of modules that ran (INC omits the others), in model order; counts per MoE layer."""
        nodes: dict[str, Any] = {}
        order = [n for n in self.mod_list if n in self.nodes or n in self.moe]
        for name in order:
            if name in self.moe:
                if self.moe[name].op.called:
                    nodes.update(self.moe[name].nodes())
            elif self.nodes[name].called:
                nodes[name] = self.nodes[name].to_node()
        return {"nodes": nodes, "mod_list": list(self.mod_list), "tokens": int(self.tokens),
                "experts": {name: m.counts.tolist() for name, m in self.moe.items()}}

    def reset(self) -> None:
        for stats in self.nodes.values():
            stats.reset()
        for stats in self.moe.values():
            stats.reset()
        self.tokens.zero_()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _after(function: Callable, record: Callable[[Any], None]) -> Callable:
    def wrapper(*args, **kwargs):
        out = function(*args, **kwargs)
        record(out)
        return out

    return wrapper


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)
