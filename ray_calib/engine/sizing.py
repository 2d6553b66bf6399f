"""Which TP sizes and context lengths a model allows, checked from config.json before any process starts.

    TP        must divide the attention heads, the routed experts (each rank of the expert-parallel layout
              INC and `unify` use holds experts/TP of them) and the MLP widths vLLM shards; and the
              cluster must offer that many devices
    context   --max-model-len may not exceed the model's max_position_embeddings

`measure`, `infer` and `eval` share these checks, so a bad `-t 16` fails the same way, at once, in
all three, naming the number that does not divide and the TPs that would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ray_calib.errors import ConfigError, EngineError
from ray_calib.model.config import num_routed_experts

MAX_TP = 64


@dataclass(frozen=True)
class ModelShape:
    """What of config.json decides how the model shards."""

    num_heads: int
    num_experts: int = 0  # routed experts per MoE layer
    widths: dict[str, int] = field(default_factory=dict)  # MLP widths TP splits, by config key
    max_positions: int | None = None  # max_position_embeddings

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        config = config.get("text_config", config)  # multimodal configs nest the language model's
        experts = num_routed_experts(config)
        keys = ("intermediate_size", "moe_intermediate_size") if experts else ("intermediate_size",)
        widths = {key: config[key] for key in keys if isinstance(config.get(key), int)}
        return cls(
            num_heads=int(config.get("num_attention_heads") or 1),
            num_experts=experts,
            widths=widths,
            max_positions=config.get("max_position_embeddings"),
        )

    def counts(self) -> list[tuple[str, int]]:
        """(what, how many) that a TP size must divide, in the order they are reported."""
        found = [("attention heads", self.num_heads)]
        if self.num_experts:
            found.append(("routed experts", self.num_experts))
        return found + [(key, width) for key, width in self.widths.items()]


def misfit(shape: ModelShape, tp_size: int) -> tuple[str, int] | None:
    """The first count `tp_size` does not divide, or None when it shards evenly."""
    return next(((what, count) for what, count in shape.counts() if count % tp_size), None)


def valid_tp_sizes(shape: ModelShape, limit: int = MAX_TP) -> list[int]:
    return [tp for tp in range(1, limit + 1) if misfit(shape, tp) is None]


def check_tp(shape: ModelShape, tp_size: int, model_id: str) -> None:
    if tp_size < 1:
        raise ConfigError(f"--tp must be at least 1, got {tp_size}", fix="pass --tp 1 or more.")
    bad = misfit(shape, tp_size)
    if bad:
        what, count = bad
        raise ConfigError(
            f"--tp {tp_size} does not divide the {count} {what} of {model_id} "
            f"({count} % {tp_size} = {count % tp_size})",
            fix=f"use --tp {_choices(shape)}.",
        )


def check_device_count(shape: ModelShape, tp_size: int, devices: int, where: str) -> None:
    """One rank per device: refuse a TP above what `where` offers, naming the TPs that fit."""
    if tp_size <= devices:
        return
    fitting = [tp for tp in valid_tp_sizes(shape) if tp <= devices]
    fix = (
        f"use --tp {' | '.join(map(str, fitting))}, or add nodes/devices (ray-calib up)"
        if fitting
        else "add nodes/devices (ray-calib up)."
    )
    raise EngineError(f"--tp {tp_size} needs {tp_size} devices but {where} offers {devices}", fix=fix)


def check_max_model_len(shape: ModelShape, max_model_len: int | None, model_id: str) -> None:
    """Refuse a context beyond what the model was built for (vLLM would refuse it only after loading)."""
    if max_model_len is None:
        return
    if max_model_len < 1:
        raise ConfigError(f"--max-model-len must be at least 1, got {max_model_len}", fix="pass a positive length.")
    if shape.max_positions and max_model_len > shape.max_positions:
        raise ConfigError(
            f"--max-model-len {max_model_len} is beyond the {shape.max_positions}-token context of "
            f"{model_id} (max_position_embeddings)",
            fix=f"pass --max-model-len {shape.max_positions} or less, or leave it out.",
        )


def _choices(shape: ModelShape) -> str:
    return " | ".join(map(str, valid_tp_sizes(shape)))


@dataclass(frozen=True)
class Devices:
    """How many devices a run may use, and where they are (for the message)."""

    count: int | None  # None: no fixed number (CPU ranks on one host are bounded by memory only)
    where: str


def choose_tp(
    shape: ModelShape, requested: int | None, *, model_id: str, devices: Devices, memory, preferred: int | None = None
) -> int:
    """The TP to run: `requested` after every check; else `preferred` (e.g. the run's unified TP) when it is
    allowed and fits; else the smallest TP the model allows that the devices hold and memory fits.

    `memory` is the pre-check (`memory.MemoryCheck`): `fits(tp)` answers, `require(tp)` raises naming the
    smallest TP that fits.
    """
    allowed = [tp for tp in valid_tp_sizes(shape) if devices.count is None or tp <= devices.count]
    if requested is not None:
        check_tp(shape, requested, model_id)
        if devices.count is not None:
            check_device_count(shape, requested, devices.count, devices.where)
        memory.require(requested, allowed)
        return requested
    for tp in ([preferred] if preferred in allowed else []) + allowed:
        if memory.fits(tp):
            return tp
    memory.require(allowed[-1] if allowed else 1, allowed)  # raises: nothing fits, with the shortfall
    raise AssertionError("unreachable: require() raised")
