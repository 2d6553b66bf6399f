"""Statistics of one fused MoE layer: the fused op, its per-expert children and per-expert token counts.

INC's layout (what unify and quantize read):

    <op>               inputs [hidden], outputs [routed output (pre-reduce), amax of the intermediate
                       act(x W13^T) of expert 0..E-1]
    <op>.w13_list.K    inputs [tokens routed to expert K], params.weight = max |W13[K]|
    <op>.w2_list.K     inputs [expert K's intermediate], params.weight = max |W2[K]|

The routed kernel is fused (and differs per backend), so the intermediate is recomputed from the
layer's input, the chosen expert ids and the expert weights as loaded (captured before any backend
repacked them): one grouped GEMM over the routed (token, expert) slots sorted by expert, whose group
offsets stay on the device. A decode step routes a few tokens, and a GEMM over a few rows per expert
costs several times the layer's own fused kernel, so each step only keeps a copy of its input and
expert ids; the statistics are folded in once `_PENDING_BYTES` of inputs are held (a few hundred
tokens for a DeepSeek-R1 layer, a whole chunk for a small model) and at collect time. Every statistic
is a device tensor updated in place; nothing is copied to the host until `nodes()` (one sync per
collect, none per layer or step). Without `torch._grouped_mm` for the device/dtype, a loop per expert
that got tokens is used instead (it reads the per-expert counts on the host: one sync per fold).

With hessians (`measure --hessians`, or unasked when they fit the budget) each expert also gets the
input second moments GPTQ rounds it with, from the tokens routed to it: H = sum(x xᵀ) of its W13 input
and of its W2 input (the recomputed intermediate), named `<op>.w13_list.K` / `<op>.w2_list.K` like its
nodes. They cost E x (hidden² + intermediate²) float32 per layer (by default recorded only for small
models), one host sync per fold (per-expert row counts), and are not recorded under expert parallelism.
"""

from __future__ import annotations

from typing import Any

import torch  # noqa: TID253  worker-side, like measure.stats (pyproject.toml)

from ray_calib.engine.weights import EXPERT_AMAX_ATTR, EXPERT_W13_ATTR
from ray_calib.measure.stats import MaxAbs, row_amax  # noqa: TID253

_GROUPED_MM: dict[tuple[str, torch.dtype], bool] = {}  # (device type, dtype) -> torch._grouped_mm works
# Per MoE layer: inputs held back so the recompute runs as a few large GEMMs (DeepSeek-R1's 58 MoE
# layers hold up to about 1 GiB per rank beside the KV cache until the next fold or collect).
_PENDING_BYTES = 16 << 20


class MoEStats:
    def __init__(self, name: str, routed: torch.nn.Module, *, hessians: bool = False) -> None:
        self.name = name
        self.num_experts = int(routed.local_num_experts)
        self.expert_map = getattr(routed, "expert_map", None)  # expert parallel: global id -> local id, -1 elsewhere
        w13 = getattr(routed, EXPERT_W13_ATTR, None)
        self.w13 = w13
        self.intermediate = w13.shape[1] // 2 if w13 is not None else 0
        self.activation = str(getattr(getattr(routed, "activation", None), "value", "silu"))
        self.called = False
        self.op_input, self.op_output = MaxAbs(), MaxAbs()
        experts = self.num_experts
        self.weight_amax = list(getattr(routed, EXPERT_AMAX_ATTR, (None, None)))  # W13, W2: [E] on the device
        device = w13.device if w13 is not None else torch.device("cpu")
        # One spare bucket at index E: slots routed to experts of other ranks (expert parallel).
        self.counts = torch.zeros(experts + 1, dtype=torch.int64, device=device)
        self.expert_input = torch.zeros(experts + 1, dtype=torch.float32, device=device)
        self.expert_inter = torch.zeros(experts + 1, dtype=torch.float32, device=device)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, expert ids) of unfolded steps
        self._pending_tokens = 0
        # per-expert H of the W13 and W2 inputs (allocated at the first fold); W2's is this rank's slice
        self.hessians = hessians and w13 is not None and self.expert_map is None
        self.w2_sharded = _tp_size(routed) > 1
        self.h13: torch.Tensor | None = None
        self.h2: torch.Tensor | None = None

    @property
    def hessian_bytes(self) -> int:
        """float32 bytes of the per-expert hessians, if recorded."""
        if self.w13 is None or self.expert_map is not None:
            return 0
        return 4 * self.num_experts * (self.w13.shape[-1] ** 2 + self.intermediate**2)

    def observe(self, x: torch.Tensor, topk_ids: torch.Tensor, out: Any) -> None:
        """One call of the layer: its input, the expert ids each token was routed to, its routed output."""
        self.called = True
        if isinstance(out, torch.Tensor):
            self.op_output.update(out)
        capacity = max(1, _PENDING_BYTES // max(1, x.shape[-1] * x.element_size()))
        if self._pending_tokens + x.shape[0] > capacity:
            self.fold()
        if x.shape[0] >= capacity:  # a long prefill step: large GEMMs already, fold it as it is
            self._fold(x.detach(), topk_ids.detach())
            return
        # copies: the engine may reuse its buffers for the next step
        self._pending.append((x.detach().clone(), topk_ids.detach().clone()))
        self._pending_tokens += x.shape[0]
        if self._pending_tokens >= capacity:
            self.fold()

    def fold(self) -> None:
        """Fold the held steps into the statistics (one pass of large GEMMs)."""
        if not self._pending:
            return
        pending, self._pending, self._pending_tokens = self._pending, [], 0
        if len(pending) == 1:
            x, topk_ids = pending[0]
        else:
            x, topk_ids = torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])
        self._fold(x, topk_ids)

    def _fold(self, x: torch.Tensor, topk_ids: torch.Tensor) -> None:
        token_amax = row_amax(x)
        self.op_input.update_amax(token_amax.amax())
        if self.counts.device != x.device:
            self._move_to(x.device)
        top_k = topk_ids.shape[-1]
        ids = topk_ids.reshape(-1).long()
        if self.expert_map is not None:
            ids = self.expert_map[ids].long()
            ids = torch.where(ids < 0, torch.full_like(ids, self.num_experts), ids)
        # scatter_add, not bincount: bincount sizes its output from the data (a host sync on CUDA)
        bins = torch.zeros_like(self.counts).scatter_add_(0, ids, torch.ones_like(ids))
        self.counts += bins
        self.expert_input.scatter_reduce_(0, ids, token_amax.float().repeat_interleave(top_k), "amax")
        if self.w13 is not None and ids.numel():
            self._observe_intermediate(x, ids, bins, top_k)

    def _observe_intermediate(self, x: torch.Tensor, ids: torch.Tensor, bins: torch.Tensor, top_k: int) -> None:
        """max |act(gate) * up| per expert over the slots routed to it, `[gate | up] = x W13[expert]^T`."""
        order = torch.argsort(ids, stable=True)
        sorted_ids = ids[order]
        rows = x.index_select(0, order // top_k)  # slots of other ranks' experts sort last and are dropped
        h = self._routed_w13(rows, bins, self.w13)
        act = self._act(h)
        inter = row_amax(act).float()
        if self.hessians:
            self._add_hessians(rows, act, bins)
        inter = torch.where(sorted_ids < self.num_experts, inter, torch.zeros_like(inter))
        self.expert_inter.scatter_reduce_(0, sorted_ids, inter, "amax")

    def _routed_w13(self, rows: torch.Tensor, bins: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
        key = (rows.device.type, rows.dtype)
        if _GROUPED_MM.get(key, True):
            offsets = torch.cumsum(bins[: self.num_experts], 0, dtype=torch.int32)
            try:
                h = torch._grouped_mm(rows, w13.transpose(-2, -1), offs=offsets)
                _GROUPED_MM[key] = True
                return h
            except (RuntimeError, NotImplementedError, AttributeError):
                _GROUPED_MM[key] = False
        h = torch.zeros(rows.shape[0], w13.shape[1], dtype=rows.dtype, device=rows.device)
        start = 0
        for expert, count in enumerate(bins[: self.num_experts].tolist()):
            if count:
                h[start : start + count] = torch.nn.functional.linear(rows[start : start + count], w13[expert])
            start += count
        return h

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        """act(gate) * up for `h = x W13^T` (gate first, as vLLM loads w13): the W2 input."""
        gate, up = h[..., : self.intermediate], h[..., self.intermediate :]
        act = torch.nn.functional.gelu(gate) if self.activation.startswith("gelu") else torch.nn.functional.silu(gate)
        return act * up

    def _add_hessians(self, rows: torch.Tensor, act: torch.Tensor, bins: torch.Tensor) -> None:
        """H += xᵀx per expert over its slots (`rows`/`act` sorted by expert, other ranks' slots last)."""
        if self.h13 is None or self.h2 is None:
            experts = self.num_experts
            self.h13 = torch.zeros(experts, rows.shape[-1], rows.shape[-1], dtype=torch.float32, device=rows.device)
            self.h2 = torch.zeros(experts, act.shape[-1], act.shape[-1], dtype=torch.float32, device=rows.device)
        start = 0
        for expert, count in enumerate(bins[: self.num_experts].tolist()):
            if count:
                x, a = rows[start : start + count].float(), act[start : start + count].float()
                self.h13[expert].addmm_(x.T, x)
                self.h2[expert].addmm_(a.T, a)
            start += count

    def hessian_matrices(self) -> dict[str, torch.Tensor]:
        """Node name -> H of each expert that got tokens (experts without any have no statistic)."""
        self.fold()
        if self.h13 is None or self.h2 is None:
            return {}
        counts = self.counts[: self.num_experts].tolist()
        out: dict[str, torch.Tensor] = {}
        for k, count in enumerate(counts):
            if count:
                out[f"{self.name}.w13_list.{k}"] = self.h13[k]
                out[f"{self.name}.w2_list.{k}"] = self.h2[k]
        return out

    def _move_to(self, device: torch.device) -> None:
        self.counts, self.expert_input, self.expert_inter = (
            t.to(device) for t in (self.counts, self.expert_input, self.expert_inter)
        )

    def nodes(self) -> dict[str, dict[str, Any]]:
        """INC nodes of the op and its children (the one host copy of this layer's statistics)."""
        self.fold()
        experts = self.num_experts
        inter = self.expert_inter[:experts].tolist()
        inputs = self.expert_input[:experts].tolist()
        w13_amax, w2_amax = (amax.tolist() if amax is not None else [None] * experts for amax in self.weight_amax)
        op = {"inputs": [[[self.op_input.get()]]], "outputs": [[[self.op_output.get()]]] + [[[v]] for v in inter]}
        out = {self.name: op}
        out.update({f"{self.name}.w13_list.{k}": _child(inputs[k], w13_amax[k]) for k in range(experts)})
        out.update({f"{self.name}.w2_list.{k}": _child(inter[k], w2_amax[k]) for k in range(experts)})
        return out

    def token_counts(self) -> list[int]:
        self.fold()
        return self.counts[: self.num_experts].tolist()

    def child_names(self) -> list[str]:
        return [f"{self.name}.{kind}.{k}" for kind in ("w13_list", "w2_list") for k in range(self.num_experts)]

    def reset(self) -> None:
        self.called = False
        self._pending, self._pending_tokens = [], 0
        self.op_input.reset()
        self.op_output.reset()
        self.counts.zero_()
        self.expert_input.zero_()
        self.expert_inter.zero_()
        self.h13 = self.h2 = None


def _tp_size(routed: torch.nn.Module) -> int:
    """The TP size the experts' intermediate is split over (vLLM's RoutedExperts keeps it in its moe_config)."""
    size = getattr(getattr(routed, "moe_config", None), "tp_size", None) or getattr(routed, "tp_size", None)
    return int(size or 1)


def _child(input_amax: float, weight: float | None) -> dict[str, Any]:
    node: dict[str, Any] = {"inputs": [[[input_amax]]]}
    if weight is not None:
        node["params"] = {"weight": [[weight]]}
    return node
