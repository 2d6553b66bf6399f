"""The running statistics observers keep: a max |x| per tensor slot, grouped per INC node.

Each value is a 0-d tensor on the device the activations live on, in their dtype (a maximum of bf16
values is a bf16 value: nothing is rounded), updated in place, so the hot path is one reduction and one
in-place maximum per tensor, with no host sync until `get()` (once per node when stats are collected).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def amax(t: torch.Tensor) -> torch.Tensor:
    """max |t| as a 0-d tensor of t's dtype (exact)."""
    return torch.linalg.vector_norm(t.detach(), ord=float("inf"))


class MaxAbs:
    """Running max |x| of one tensor slot."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def update(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return
        self.update_amax(amax(t))

    def update_amax(self, value: torch.Tensor) -> None:
        if self.value is None:
            self.value = value.clone()
        elif self.value.dtype == value.dtype:
            torch.maximum(self.value, value, out=self.value)
        else:  # tensors of two dtypes in one slot: keep float32, which holds both exactly
            self.value = torch.maximum(self.value.float(), value.float())

    def get(self) -> float:
        return 0.0 if self.value is None else float(self.value)

    def reset(self) -> None:
        self.value = None


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
