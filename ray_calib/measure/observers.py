"""Maxabs observers installed on a vLLM model inside one worker (one TP rank).

What is recorded, per node name (the vLLM module path), in INC's layout:

    linear layer         inputs [x]; params.weight (this rank's shard, taken before the CPU repack)
    RowParallelLinear    outputs [pre-reduce partial output of this rank, post-reduce output]
    <moe runner>         the fused MoE op and its per-expert children (see `moe`)
    <attn>.impl.k_cache / .impl.v_cache     (--fp8-kv) K and V as written to the cache (MHA/GQA)
    <mla>.impl.latent_cache_k               (--fp8-kv) [kv_c_normed | k_pe], the MLA latent cache

Independent of the kernels vLLM picks. vLLM chooses attention and MoE kernels per device, build and
CPU features (AMX_MLA or CPU_MLA on CPUs, FlashMLA / FlashInfer / Cutlass / Triton MLA on CUDA,
modular or monolithic MoE kernels), and a kernel may skip a module's forward. So every range is
taken where every backend passes, never inside a kernel:

    linear layers        forward pre-hook: the model code calls the module (q/kv/o projections, MLPs,
                         shared experts, fused_qkv_a_proj, q_b_proj) before or after attention and
                         MoE, whatever kernel runs there.
    MLA kv_b_proj        its input is the latent the MLA layer receives, MLAAttention.forward(q,
                         kv_c_normed, k_pe), every token of every step. Backends call kv_b_proj itself
                         only in prefill (CPU_MLA and the CUDA MLA backends, `forward_mha`), fold it
                         into W_UK/W_UV for decode, or never call it (AMX_MLA); its weight range is
                         the load-time capture, taken before AMX_MLA empties kv_b_proj.weight.
    routed experts       MoERunner._apply_quant_method(hidden_states, router_logits): modular kernels
                         (router.select_experts, then routed_experts.forward_modular) and monolithic
                         ones (routing inside the kernel, e.g. FlashInfer TRT-LLM on CUDA) both pass
                         there. Expert ids come from the router's select_experts when the kernel
                         called it, else from calling it on the same logits.
    KV caches            Attention.forward(q, k, v) / MLAAttention.forward(q, kv_c_normed, k_pe)
                         arguments: the cache-update and attention custom ops run inside forward on
                         every platform, so the pre-hook sees them on CPU and CUDA alike.

On CUDA, measurement runs eager (the measure engine profile sets enforce_eager): a replayed CUDA
graph or a compiled graph would run kernels without calling these Python hooks. On Gaudi, `measure`
does not install these observers: INC's own patched modules measure there (see `gaudi`); the HPU
MLA backend calls kv_b_proj for every step, which is why INC's kv_b_proj node holds the latent.

A module of a kind the observers do not know -- an attention layer that is neither `Attention` nor
`MLAAttention`, expert weights outside a `MoERunner`, or a runner class with its own
`_apply_quant_method` -- is listed in `uncovered`; the head refuses the run with its class name.
Observers only accumulate (running max, token counts) and `remove()` puts back every method they
replaced, so the same engine runs exactly as before.

Hessians (H = sum(x xᵀ) of a layer's input, for GPTQ) come from the same places: the linear pre-hooks,
the MLA latent for kv_b_proj, and the routed tokens of each expert (`moe`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch  # noqa: TID253  worker-side, like measure.stats (pyproject.toml)

from ray_calib.engine.weights import WEIGHT_AMAX_ATTR
from ray_calib.inc.quant_config import KV_TYPES  # INC's KV module types, as QUANT_CONFIG names them
from ray_calib.measure.moe import MoEStats  # noqa: TID253
from ray_calib.measure.stats import Hessian, MaxAbs, NodeStats, amax  # noqa: TID253

HESSIAN_BUDGET = 1 << 30  # bytes of hessians per rank recorded by default (GPTQ for small models)


@dataclass
class Blocklist:
    """QUANT_CONFIG's blocklist: names are regexes (re.search), types are module class names."""

    names: tuple[str, ...] = ()
    types: tuple[str, ...] = ()

    def blocks(self, name: str, type_name: str = "") -> bool:
        return type_name in self.types or any(re.search(p, name) for p in self.names)


@dataclass(frozen=True)
class Uncovered:
    module: str
    cls: str  # module.qualname of the class
    kind: str  # "attention" | "MoE"


class ModelObserver:
    """Installs hooks on a vLLM model and hands back plain-dict stats for this rank."""

    def __init__(
        self, model: torch.nn.Module, *, fp8_kv: bool, blocklist: Blocklist, hessians: bool | None = False
    ) -> None:
        """hessians: True records them, None only when this rank's fit in HESSIAN_BUDGET bytes."""
        self.model = model
        self.fp8_kv = fp8_kv
        self.hessians: dict[str, Hessian] | None = None if hessians is False else {}
        self.hessian_bytes = 0  # what recording them costs this rank (float32 H of every linear input)
        self.hessian_kept = 0  # what the ones recorded cost (unasked: those `within_budget` keeps)
        self._hessians_auto = hessians is None
        self.blocklist = blocklist
        self.nodes: dict[str, NodeStats] = {}  # in module order
        self.moe: dict[str, MoEStats] = {}
        self.mod_list: list[str] = []
        self.uncovered: list[Uncovered] = []
        self.tokens = torch.zeros((), dtype=torch.int64)
        self._attention: dict[str, torch.nn.Module] = {}
        self._runners: dict[str, torch.nn.Module] = {}
        self._latent_hessian: dict[int, str] = {}  # id(MLAAttention) -> its kv_b_proj's hessian name
        self._handles: list[Any] = []
        self._patches: list[tuple[Any, str, bool, Any]] = []  # (object, attribute, had its own, old value)
        self._install()

    # ---- installation ----------------------------------------------------------------------------
    def _install(self) -> None:
        from vllm.model_executor.layers.attention.attention import Attention
        from vllm.model_executor.layers.attention.mla_attention import MLAAttention
        from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
        from vllm.model_executor.layers.linear import LinearBase, RowParallelLinear
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        modules = list(self.model.named_modules())
        latent_of = {
            id(m.kv_b_proj): m
            for _, m in modules
            if isinstance(m, MLAAttention) and getattr(m, "kv_b_proj", None) is not None
        }
        routed = {id(getattr(m, "routed_experts", None)) for _, m in modules if isinstance(m, MoERunner)}
        latent_stats: dict[int, NodeStats] = {}  # id(MLAAttention) -> its kv_b_proj's node
        counting = False
        for name, module in modules:
            type_name = type(module).__name__
            if not counting and type(module) is VocabParallelEmbedding:  # the input embedding, not lm_head
                self._handles.append(module.register_forward_pre_hook(self._count_tokens))
                counting = True
            if self.blocklist.blocks(name, type_name):
                continue
            if isinstance(module, LinearBase):
                stats = self._add_linear(name, module, isinstance(module, RowParallelLinear))
                if id(module) in latent_of:  # recorded from the MLA layer's latent, see the module docstring
                    latent_stats[id(latent_of[id(module)])] = stats
                    if self.hessians is not None:  # the whole latent on every rank (column-parallel)
                        self.hessians[name] = Hessian(sharded=False, columns=_input_columns(module))
                        self._latent_hessian[id(latent_of[id(module)])] = name
                else:
                    self._hook_linear(name, module, stats)
            elif isinstance(module, MoERunner):
                if type(module)._apply_quant_method is not MoERunner._apply_quant_method:
                    self.uncovered.append(Uncovered(name, _class_name(module), "MoE"))
                else:
                    self._runners[name] = module
                    self._install_moe(name, module)
            elif isinstance(module, (Attention, MLAAttention)):
                self._attention[name] = module
            elif isinstance(module, AttentionLayerBase):
                self.uncovered.append(Uncovered(name, _class_name(module), "attention"))
            elif _holds_experts(module) and id(module) not in routed:
                self.uncovered.append(Uncovered(name, _class_name(module), "MoE"))
        for name, module in self._attention.items():
            self._install_attention(name, module, isinstance(module, MLAAttention), latent_stats.get(id(module)))
        if self.hessians is not None:
            self._fit_hessians()

    def _fit_hessians(self) -> None:
        """Unasked (auto), record only the hessians `within_budget` keeps; asked for, all of them."""
        assert self.hessians is not None
        sizes = {name: 4 * h.columns**2 for name, h in self.hessians.items()}
        sizes.update({name: m.hessian_bytes for name, m in self.moe.items() if m.hessians})
        self.hessian_bytes = self.hessian_kept = sum(sizes.values())
        if not self._hessians_auto or self.hessian_bytes <= HESSIAN_BUDGET:
            return
        kept = within_budget(sizes, HESSIAN_BUDGET)
        self.hessian_kept = sum(sizes[name] for name in kept)
        for name, moe in self.moe.items():
            moe.hessians = moe.hessians and name in kept
        self.hessians = {name: h for name, h in self.hessians.items() if name in kept} if kept else None

    def _count_tokens(self, module, args) -> None:
        self.tokens += args[0].numel()

    def _add_linear(self, name: str, module, row_parallel: bool) -> NodeStats:
        weight = getattr(module, WEIGHT_AMAX_ATTR, None)
        if weight is None and getattr(module, "weight", None) is not None and module.weight.numel():
            weight = amax(module.weight)
        reduces = row_parallel and getattr(module, "reduce_results", True)
        outputs = [MaxAbs() for _ in range(2 if reduces else 1)] if row_parallel else []
        if reduces and getattr(module, "tp_size", None) == 1:  # nothing to reduce: one slot serves both
            outputs = [outputs[0], outputs[0]]
        stats = NodeStats(inputs=[MaxAbs()], outputs=outputs, weight=None if weight is None else float(weight))
        self._add(name, stats)
        return stats

    def _hook_linear(self, name: str, module, stats: NodeStats) -> None:
        if self.hessians is not None:  # row-parallel layers (outputs recorded) see a slice of the input
            self.hessians[name] = Hessian(sharded=bool(stats.outputs), columns=_input_columns(module))

        def pre_hook(mod, args):
            stats.called = True
            stats.inputs[0].update(args[0])
            hessian = None if self.hessians is None else self.hessians.get(name)  # not every one fits the budget
            if hessian is not None:
                hessian.update(args[0])

        self._handles.append(module.register_forward_pre_hook(pre_hook))
        if not stats.outputs:
            return
        # The partial output of this rank exists only between quant_method.apply and the all-reduce.
        # A method object may be shared by layers: this layer gets its own copy.
        method = copy.copy(module.quant_method)
        self._patch(module, "quant_method", method)
        self._patch(method, "apply", _after(method.apply, stats.outputs[0].update))
        if len(stats.outputs) == 2 and stats.outputs[1] is not stats.outputs[0]:

            def hook(mod, args, output):
                stats.outputs[1].update(output[0] if isinstance(output, tuple) else output)

            self._handles.append(module.register_forward_hook(hook))

    def _install_moe(self, name: str, runner) -> None:
        stats = MoEStats(name, runner.routed_experts, hessians=self.hessians is not None)
        self.moe[name] = stats
        self.mod_list.append(name)
        self.mod_list.extend(stats.child_names())
        router = runner.router
        select = router.select_experts
        routing: dict[str, torch.Tensor] = {}  # the expert ids the kernel asked the router for, this call

        def select_experts(*args, **kwargs):
            weights, ids = select(*args, **kwargs)
            routing["ids"] = ids
            return weights, ids

        apply = runner._apply_quant_method

        def apply_quant_method(*args, **kwargs):
            hidden = _arg(args, kwargs, 0, "hidden_states")
            routing.clear()
            out = apply(*args, **kwargs)
            ids = routing.get("ids")
            if ids is None:  # a monolithic kernel routed inside itself: route the same logits here
                _, ids = select(
                    hidden_states=hidden,
                    router_logits=_arg(args, kwargs, 1, "router_logits"),
                    topk_indices_dtype=None,
                    input_ids=_arg(args, kwargs, 3, "input_ids"),
                )
            stats.observe(hidden, ids, out[1] if isinstance(out, tuple) else out)
            return out

        self._patch(router, "select_experts", select_experts)
        self._patch(runner, "_apply_quant_method", apply_quant_method)

    def _install_attention(self, name: str, module, mla: bool, latent: NodeStats | None) -> None:
        """One pre-hook per attention layer: the MLA latent (kv_b_proj's input) and, with --fp8-kv, the cache."""
        kv = self.fp8_kv and not set(KV_TYPES) & set(self.blocklist.types)
        if mla:
            cache = self._add(f"{name}.impl.latent_cache_k", NodeStats(inputs=[MaxAbs()])) if kv else None
            if latent is None and cache is None:
                return
            kv_b_proj = self._latent_hessian.get(id(module))

            def mla_hook(mod, args, kwargs):
                kv_c, k_pe = _arg(args, kwargs, 1, "kv_c_normed"), _arg(args, kwargs, 2, "k_pe")
                if latent is not None:
                    latent.called = True
                    latent.inputs[0].update(kv_c)
                    hessian = None if self.hessians is None or kv_b_proj is None else self.hessians.get(kv_b_proj)
                    if hessian is not None:
                        hessian.update(kv_c)
                if cache is not None:  # the cache row is [kv_c_normed | k_pe]
                    cache.called = True
                    cache.inputs[0].update(kv_c)
                    cache.inputs[0].update(k_pe)

            self._handles.append(module.register_forward_pre_hook(mla_hook, with_kwargs=True))
            return
        if not kv:
            return
        k_stats = self._add(f"{name}.impl.k_cache", NodeStats(inputs=[MaxAbs()]))
        v_stats = self._add(f"{name}.impl.v_cache", NodeStats(inputs=[MaxAbs()]))

        def kv_hook(mod, args, kwargs):
            k_stats.called = v_stats.called = True
            k_stats.inputs[0].update(_arg(args, kwargs, 1, "key"))
            v_stats.inputs[0].update(_arg(args, kwargs, 2, "value"))

        self._handles.append(module.register_forward_pre_hook(kv_hook, with_kwargs=True))

    def _add(self, name: str, stats: NodeStats) -> NodeStats:
        self.nodes[name] = stats
        self.mod_list.append(name)
        return stats

    def _patch(self, owner: Any, attribute: str, value: Any) -> None:
        """Set `owner.attribute`, remembering whether the instance had its own value (else the class's)."""
        own = attribute in vars(owner) or attribute in getattr(owner, "_modules", {})
        self._patches.append((owner, attribute, own, getattr(owner, attribute) if own else None))
        setattr(owner, attribute, value)

    # ---- what runs -------------------------------------------------------------------------------
    def backends(self) -> dict[str, list[str]]:
        """The attention backends and MoE kernels vLLM chose for this rank (for logs and errors)."""
        attention = {m.attn_backend.get_name() for m in self._attention.values() if hasattr(m, "attn_backend")}
        moe = {_moe_kernel(runner) for runner in self._runners.values()}
        return {"attention": sorted(attention), "moe": sorted(moe)}

    # ---- results ---------------------------------------------------------------------------------
    def collect(self) -> dict[str, Any]:
        """Nodes of modules that ran (INC omits the others), in model order; counts per MoE layer."""
        nodes: dict[str, Any] = {}
        for name in self.mod_list:
            if name in self.moe:
                if self.moe[name].called:
                    nodes.update(self.moe[name].nodes())
            elif name in self.nodes and self.nodes[name].called:
                nodes[name] = self.nodes[name].to_node()
        result = {
            "nodes": nodes,
            "mod_list": list(self.mod_list),
            "tokens": int(self.tokens),
            "experts": {name: m.token_counts() for name, m in self.moe.items()},
        }
        if self.hessians is not None:
            called = {n: h for n, h in self.hessians.items() if h.matrix is not None}
            matrices = {n: h.get().tobytes() for n, h in called.items()}  # see chunks.hessians_from_result
            sharded = sorted(n for n, h in called.items() if h.sharded)
            for moe in self.moe.values():
                experts = moe.hessian_matrices()
                matrices.update({n: m.cpu().numpy().tobytes() for n, m in experts.items()})
                sharded += sorted(n for n in experts if moe.w2_sharded and ".w2_list." in n)
            result["hessians"], result["sharded"] = matrices, sharded
        return result

    def reset(self) -> None:
        for stats in self.nodes.values():
            stats.reset()
        for moe_stats in self.moe.values():
            moe_stats.reset()
        for hessian in (self.hessians or {}).values():
            hessian.reset()
        self.tokens.zero_()

    def remove(self) -> None:
        """Remove every hook and put back every replaced attribute, newest first."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for owner, attribute, own, old in reversed(self._patches):
            if own:
                setattr(owner, attribute, old)
            else:
                delattr(owner, attribute)
        self._patches.clear()


def _after(function: Callable, record: Callable[[Any], None]) -> Callable:
    def wrapper(*args, **kwargs):
        out = function(*args, **kwargs)
        record(out)
        return out

    return wrapper


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def within_budget(sizes: dict[str, int], budget: int) -> set[str]:
    """The hessians (name -> bytes; an MoE layer's experts are one) recorded unasked: the smallest first, in
    model order among equals, while they fit `budget`. A DeepSeek-R1 rank keeps MLA's kv_b_proj and q_b_proj
    (inputs: the 512- and 1536-wide latents, ~0.6 GiB for 61 layers) and rounds its 7168-wide layers and
    its experts to nearest; a model that fits whole keeps everything."""
    kept: set[str] = set()
    total = 0
    for name, size in sorted(sizes.items(), key=lambda item: item[1]):
        if total + size > budget:
            break
        kept.add(name)
        total += size
    return kept


def _input_columns(module) -> int:
    """This rank's input width of a vLLM linear layer (its weight may be repacked on CPU)."""
    return int(getattr(module, "input_size_per_partition", None) or module.input_size)


def _class_name(module: torch.nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _holds_experts(module: torch.nn.Module) -> bool:
    """Stacked per-expert weights ([experts, out, in]) held by this module itself."""
    weight = getattr(module, "w13_weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 3


def _moe_kernel(runner) -> str:
    method = runner.routed_experts.quant_method
    experts = getattr(getattr(method, "moe_kernel", None), "fused_experts", None)
    return type(experts).__name__ if experts is not None else type(method).__name__
