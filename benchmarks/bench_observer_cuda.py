"""Observer overhead on a CUDA GPU, at the layer shapes of one TP=8 rank of the real models.

    python benchmarks/bench_observer_cuda.py [--layers 8] [--repeats 9]

vLLM is not needed: the layers are plain bf16 GEMMs of the shapes a rank holds, and the observers are
the ones `measure` hooks in (`MaxAbs` per linear input and row-parallel output; `MoEStats` per MoE
layer, recomputing the expert intermediate by grouped GEMM). Eager, as the measure profile runs.
    dense   Llama-3.1-405B at TP8: qkv 16384->2304, o 2048->16384, gate_up 16384->13312, down 6656->16384
    moe     DeepSeek-R1 at TP8: router 7168->256, 256 experts top-8, w13 7168->2*256, w2 256->7168, routed
            through grouped GEMMs (a stand-in for the fused MoE kernel, which is faster: the ratio is a
            lower bound of the real one)
Each case runs prefill (2048 tokens) and decode (64 tokens per step) with and without observers,
interleaved (ABAB) `--repeats` times; printed: median time per forward, the ratio, and the spread of
the ratio over the repeats. Target (issue: observer overhead) <= 1.10.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from types import SimpleNamespace

import torch  # noqa: TID253  a torch benchmark script: nothing imports it

from ray_calib.engine.weights import EXPERT_AMAX_ATTR, EXPERT_W13_ATTR
from ray_calib.measure.moe import MoEStats  # noqa: TID253
from ray_calib.measure.stats import MaxAbs  # noqa: TID253

BF16 = torch.bfloat16


def dense_layers(layers: int) -> list[dict[str, torch.Tensor]]:
    shapes = {"qkv": (2304, 16384), "o": (16384, 2048), "gate_up": (13312, 16384), "down": (16384, 6656)}
    return [{k: torch.randn(s, device="cuda", dtype=BF16) * 0.02 for k, s in shapes.items()} for _ in range(layers)]


def dense_forward(weights, x: torch.Tensor, observe: dict | None) -> torch.Tensor:
    linear = torch.nn.functional.linear
    for i, w in enumerate(weights):
        seen = (observe or {}).get(i)
        if seen:
            seen["qkv"].update(x)
        qkv = linear(x, w["qkv"])
        attn = qkv[:, :2048].contiguous()  # attention itself is not observed: its output stands in
        if seen:
            seen["o"].update(attn)
        o = linear(attn, w["o"])
        if seen:
            seen["o_out"].update(o)
        x = x + o
        if seen:
            seen["gate_up"].update(x)
        gate, up = linear(x, w["gate_up"]).chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        if seen:
            seen["down"].update(h)
        down = linear(h, w["down"])
        if seen:
            seen["down_out"].update(down)
        x = x + down
    return x


def moe_layers(layers: int) -> list[SimpleNamespace]:
    experts, hidden, inter = 256, 7168, 256
    out = []
    for _ in range(layers):
        w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=BF16) * 0.02
        w2 = torch.randn(experts, hidden, inter, device="cuda", dtype=BF16) * 0.02
        routed = SimpleNamespace(local_num_experts=experts, expert_map=None, activation=SimpleNamespace(value="silu"))
        setattr(routed, EXPERT_W13_ATTR, w13)
        setattr(routed, EXPERT_AMAX_ATTR, (w13.abs().amax((1, 2)).float(), w2.abs().amax((1, 2)).float()))
        router = torch.randn(experts, hidden, device="cuda", dtype=BF16) * 0.02
        out.append(SimpleNamespace(w13=w13, w2=w2, router=router, routed=routed, inter=inter))
    return out


def moe_forward(layers, x: torch.Tensor, observe: dict | None) -> torch.Tensor:
    for i, layer in enumerate(layers):
        ids = torch.topk(torch.nn.functional.linear(x, layer.router), 8, dim=-1).indices
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        rows = x.index_select(0, order // 8)
        offsets = torch.cumsum(torch.bincount(flat, minlength=256), 0, dtype=torch.int32)
        gate, up = torch._grouped_mm(rows, layer.w13.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        y = torch._grouped_mm(h, layer.w2.transpose(-2, -1), offs=offsets)
        routed_out = torch.zeros_like(x).index_add_(0, order // 8, y)
        if observe is not None:
            observe[i].observe(x, ids, routed_out)
        x = x + routed_out
    return x


def timed(step: Callable[[], None], runs: int) -> float:
    """Median milliseconds of `step` over `runs` (CUDA events)."""
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def compare(name: str, forward, weights, tokens: int, steps: int, repeats: int, observers) -> None:
    x = torch.randn(tokens, weights_hidden(weights), device="cuda", dtype=BF16)

    def run(observe) -> None:
        for _ in range(steps):
            forward(weights, x, observe)
        if observe is not None and hasattr(next(iter(observe.values())), "fold"):
            for stats in observe.values():
                stats.fold()  # collect time: the held decode steps are folded

    plain_observers = observers()
    run(None), run(plain_observers)  # warm-up (kernels, cuBLAS handles, grouped GEMM plans)
    base, hooked = [], []
    for _ in range(repeats):
        base.append(timed(lambda: run(None), 1))
        hooked.append(timed(lambda: run(observers()), 1))
    ratios = [h / b for h, b in zip(hooked, base)]
    print(
        f"  {name:<28} plain {statistics.median(base):8.2f} ms   observed {statistics.median(hooked):8.2f} ms   "
        f"ratio {statistics.median(ratios):.3f} (spread {min(ratios):.3f}-{max(ratios):.3f})"
    )


def weights_hidden(weights) -> int:
    first = weights[0]
    return first["qkv"].shape[1] if isinstance(first, dict) else first.router.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_observer_cuda: no CUDA device here")
    print(f"observer overhead on {torch.cuda.get_device_name()} ({args.layers} layers, {args.repeats} repeats)")
    dense = dense_layers(args.layers)
    slots = ("qkv", "o", "o_out", "gate_up", "down", "down_out")

    def dense_observers():
        return {i: {k: MaxAbs() for k in slots} for i in range(args.layers)}

    compare("dense prefill 2048 tokens", dense_forward, dense, 2048, 1, args.repeats, dense_observers)
    compare("dense decode 64 x 32 steps", dense_forward, dense, 64, 32, args.repeats, dense_observers)
    del dense
    moe = moe_layers(args.layers)

    def moe_observers():
        return {i: MoEStats(f"layers.{i}.mlp.experts", layer.routed) for i, layer in enumerate(moe)}

    compare("moe prefill 2048 tokens", moe_forward, moe, 2048, 1, args.repeats, moe_observers)
    compare("moe decode 64 x 32 steps", moe_forward, moe, 64, 32, args.repeats, moe_observers)
    print("target: ratio <= 1.10")


if __name__ == "__main__":
    main()
