"""Which scales the FP8 checkpoint gets on CPU/CUDA when no --scale-method is given.

Gaudi keeps INC's methods and their semantics exactly (`inc.methods`). On CPU/CUDA the checkpoint
is compressed-tensors FP8, which takes any float scale: there the choice is ours. Each candidate below is
one `ScaleChoice`; `DEFAULT` is the one chosen on a real model (SmolLM2-135M-Instruct), on a validation
split of its calibration source that no calibration saw (`benchmarks/bench_quality_choices.py`; README): with GPTQ
rounding (`convert.gptq`, used whenever `measure` recorded hessians) no weight/activation candidate beat the
full range beyond the noise of the split (per-channel weights came within 1 % in KL at a higher
perplexity, so weights stay per tensor), and a k/v backoff of 0.6 beat the full range and 0.5 beyond it.
What lowered the error on every source was the rounding itself, not the scale. Whether the calibrated k/v
scales or vLLM's scale 1.0 are written is decided per model by `quantize --kv-scales auto`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ray_calib.inc.methods import ScaleMethod, TensorRule, get_method


@dataclass(frozen=True)
class ScaleChoice:
    name: str
    method: ScaleMethod  # weight and activation rules
    kv_backoff: float  # k/v scale = maxabs / (fullscale * kv_backoff)

    def kv_rule(self) -> TensorRule:
        return TensorRule(backoff=self.kv_backoff)


def _choice(name: str, weight: TensorRule, activation: TensorRule, kv_backoff: float) -> ScaleChoice:
    return ScaleChoice(name, ScaleMethod(name, weight, activation), kv_backoff)


CANDIDATES: dict[str, ScaleChoice] = {
    c.name: c
    for c in (
        # INC's maxabs_arbitrary: weight backoff 0.5, activation (and KV) backoff 0.25
        ScaleChoice("inc_backoffs", get_method("maxabs_arbitrary"), 0.25),
        # the full FP8 range for everything: maxabs maps onto 448
        _choice("full_range", TensorRule(), TensorRule(), 1.0),
        _choice("full_range_kv_0.6", TensorRule(), TensorRule(), 0.6),
        _choice("full_range_kv_half", TensorRule(), TensorRule(), 0.5),
        _choice("act_half", TensorRule(), TensorRule(backoff=0.5), 1.0),
        # one weight scale per output channel (compressed-tensors `channel`), activations and k/v as full_range
        _choice("channel", TensorRule(granularity="pcs"), TensorRule(), 1.0),
        # per channel, each row's scale the one of maxabs x {1, 0.9, ..., 0.6} with the least FP8 round-trip MSE
        _choice(
            "channel_mse",
            TensorRule(value="opt", granularity="pcs", candidates=(1.0, 0.9, 0.8, 0.7, 0.6)),
            TensorRule(),
            1.0,
        ),
    )
}
WEIGHT_STRATEGIES = {"tensor": "pts", "channel": "pcs"}  # compressed-tensors strategy -> INC granularity

DEFAULT = CANDIDATES["full_range_kv_0.6"]


def default_choice(
    *, input_backoff: float | None = None, weight_backoff: float | None = None, weight_strategy: str | None = None
) -> ScaleChoice:
    """The CPU/CUDA default, with the user's backoffs and weight strategy (tensor | channel) applied on top."""
    method = DEFAULT.method
    if weight_strategy is not None:
        granularity = WEIGHT_STRATEGIES[weight_strategy]
        if granularity != method.weight.granularity:
            method = replace(
                method, name=f"{method.name}:{weight_strategy}", weight=replace(method.weight, granularity=granularity)
            )
    if input_backoff is not None:
        method = replace(method, activation=replace(method.activation, backoff=input_backoff))
    if weight_backoff is not None:
        method = replace(method, weight=replace(method.weight, backoff=weight_backoff))
    return replace(DEFAULT, method=method)
