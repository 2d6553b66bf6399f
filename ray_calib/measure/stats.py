"""The running statistics observers keep: a max |x| per tensor slot, grouped per INC node.

Each slot keeps the running maximum and minimum of x as 0-d tensors on the device the activations
live on, in their dtype (the extremes of bf16 values are bf16 values: nothing is rounded), updated in
place: one `aminmax` pass over the tensor (no |x| copy; `vector_norm(ord=inf)` is several times
slower on CPU for bf16) and two in-place updates per call, with no host sync until `get()` (once per
node, when stats are collected). max |x| = max(max x, -min x).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch  # noqa: TID253  worker-side statistics of torch tensors: heavy by nature (pyproject.toml)


def amax(t: torch.Tensor) -> torch.Tensor:
    """max |t| as a 0-d tensor of t's dtype (exact)."""
    lo, hi = torch.aminmax(t.detach())
    return torch.maximum(hi, lo.neg())


def row_amax(t: torch.Tensor) -> torch.Tensor:
    """max |t| over the last dimension, in t's dtype (exact)."""
    return t.detach().abs().amax(dim=-1)


class MaxAbs:
    """Running max |x| of one tensor slot."""

    __slots__ = ("hi", "lo")

    def __init__(self) -> None:
        self.hi: torch.Tensor | None = None  # running max of x
        self.lo: torch.Tensor | None = None  # running min of x

    def update(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return
        lo, hi = torch.aminmax(t.detach())
        self.hi = _running(self.hi, hi, torch.maximum)
        self.lo = _running(self.lo, lo, torch.minimum)

    def update_amax(self, value: torch.Tensor) -> None:
        """Fold in an already reduced max |x| (>= 0)."""
        self.hi = _running(self.hi, value, torch.maximum)

    def get(self) -> float:
        top = 0.0 if self.hi is None else float(self.hi)
        return max(top, 0.0 if self.lo is None else -float(self.lo))

    def reset(self) -> None:
        self.hi = self.lo = None


def _running(current: torch.Tensor | None, value: torch.Tensor, op) -> torch.Tensor:
    if current is None:
        return value.clone()
    if current.dtype == value.dtype:
        return op(current, value, out=current)
    return op(current.float(), value.float())  # two dtypes in one slot: float32 holds both exactly


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
            m.reset()
        self.called = False


class Hessian:
    """Running H = sum(x xᵀ) of a linear layer's input rows, float32 (`measure --hessians`, for GPTQ)."""

    __slots__ = ("columns", "matrix", "sharded")

    def __init__(self, *, sharded: bool, columns: int) -> None:
        self.matrix: torch.Tensor | None = None  # allocated at the first update
        self.sharded = sharded  # input split across ranks (row-parallel)
        self.columns = columns

    def update(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return
        rows = t.detach().reshape(-1, t.shape[-1]).to(torch.float32)
        if self.matrix is None:
            self.matrix = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float32, device=rows.device)
        self.matrix.addmm_(rows.T, rows)

    def get(self) -> Any:
        """A numpy copy on the host (one device sync, at collect time)."""
        assert self.matrix is not None
        return self.matrix.cpu().numpy().copy()

    def reset(self) -> None:
        self.matrix = None
