"""What a vLLM engine on Gaudi needs beyond the CPU/CUDA ones: the INC flow's env, the checkpoint route,
and whether the model fits the cards and the hosts before anything starts.

Measure (INC MEASURE) and serve (INC QUANTIZE) run the same way the upstream Gaudi calibration scripts
run them:

    measure   QUANT_CONFIG=<measure config>  PT_HPU_WEIGHT_SHARING=0  VLLM_SKIP_WARMUP=true
              LLM(model, dtype=bfloat16, tensor_parallel_size=N, trust_remote_code=True,
                  enable_expert_parallel=<MoE>, distributed_executor_backend=ray|mp)   # BF16 KV cache
    serve     QUANT_CONFIG=<quantize config>  PT_HPU_WEIGHT_SHARING=0
              LLM(..., kv_cache_dtype=fp8_inc when the config quantizes the KV cache)

Two checkpoint routes: BF16 weights with `quantization="inc"` (INC quantizes them at load), and the
FP8 (block) checkpoint itself with no `quantization` argument: its config names `fp8`, and QUANT_CONFIG
alone turns INC on (vLLM refuses a `quantization` that differs from the checkpoint's). With QUANT_CONFIG
set, vllm-gaudi loads weights on the host first and moves them (MoE experts before INC patches them),
so every node needs host RAM for its ranks' shards and every card HBM for its shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ray_calib.engine.device import GiB
from ray_calib.errors import EngineError, ModelError

MEASURE_ENV = {"PT_HPU_WEIGHT_SHARING": "0", "VLLM_SKIP_WARMUP": "true"}
SERVE_ENV = {"PT_HPU_WEIGHT_SHARING": "0"}
LAZY_COLLECTIVES = {"PT_HPU_ENABLE_LAZY_COLLECTIVES": "true"}  # needed by HPU graphs at TP > 1
FP8_CHECKPOINT_ENV = {"VLLM_HPU_FORCE_CHANNEL_FP8": "0"}  # keep block scales; INC handles the FP8 weights
HBM_UTILIZATION = 0.9  # vLLM's gpu_memory_utilization default
HBM_RESERVE = 1 * GiB  # activations, HPU graphs, allocator slack


@dataclass(frozen=True)
class Route:
    name: str  # "bf16" | "fp8-checkpoint"
    quantization: str | None  # LLM(quantization=...)
    env: dict[str, str]
    description: str


def route_for(model_config: dict, model: str) -> Route:
    """How INC gets at this checkpoint on Gaudi; quantized formats INC cannot take are refused."""
    text_config = model_config.get("text_config") or {}
    quant = model_config.get("quantization_config") or text_config.get("quantization_config")
    if not quant:
        return Route("bf16", "inc", {}, "BF16 weights, INC quantizes at load (quantization='inc')")
    method = str(quant.get("quant_method", "")).lower()
    if method == "fp8":
        return Route(
            "fp8-checkpoint",
            None,
            dict(FP8_CHECKPOINT_ENV),
            "FP8 checkpoint as it is: QUANT_CONFIG alone enables INC (no quantization argument), "
            "VLLM_HPU_FORCE_CHANNEL_FP8=0",
        )
    raise ModelError(
        f"{model}: the checkpoint is quantized with '{method}'; INC on Gaudi measures BF16 or FP8 (block) checkpoints",
        fix="pass the BF16 model or the original FP8 checkpoint.",
    )


def engine_env(
    *, measure: bool, tp_size: int, route: Route, quant_config: str, timeout_s: int, expert_parallel: bool = False
) -> dict[str, str]:
    """Every variable the ranks need, in the order they are documented above.

    VLLM_EP_SIZE is what the HabanaAI vLLM fork reads for expert parallelism; vllm-gaudi reads the
    engine argument `enable_expert_parallel` (both are set, each stack ignores the other).
    """
    from ray_calib.engine.launch import timeout_env

    env = {"QUANT_CONFIG": quant_config, **(MEASURE_ENV if measure else SERVE_ENV)}
    if tp_size > 1:
        env.update(LAZY_COLLECTIVES)
    if expert_parallel:
        env["VLLM_EP_SIZE"] = str(tp_size)
    env.update(route.env)
    env.update(timeout_env(timeout_s))
    return env


@dataclass
class Fit:
    """Weights per card and per host for one TP on Gaudi, and what each has."""

    weights_bytes: int
    tp_size: int
    ranks_per_node: int
    card_bytes: int  # HBM of one card
    hosts: dict[str, int | None] = field(default_factory=dict)  # node -> MemAvailable (None: not probed)
    card_share: float = 1.0  # share of a rank's weights on its card at the peak (0.5: FP8-converted on the host)

    @property
    def card_need(self) -> int:
        return int(self.weights_bytes // self.tp_size * self.card_share) + HBM_RESERVE

    @property
    def card_budget(self) -> int:
        return int(self.card_bytes * HBM_UTILIZATION)

    @property
    def host_need(self) -> int:
        return self.ranks_per_node * (self.weights_bytes // self.tp_size)

    def problems(self) -> list[str]:
        found = []
        if self.card_need > self.card_budget:
            found.append(
                f"{self.card_need / GiB:.1f} GiB per card (weights {self.weights_bytes / GiB:.1f} GiB / "
                f"TP {self.tp_size} + {HBM_RESERVE / GiB:.0f} GiB) > {self.card_budget / GiB:.1f} GiB "
                f"usable of {self.card_bytes / GiB:.0f} GiB HBM"
            )
        for node, available in self.hosts.items():
            if available is not None and self.host_need > available:
                found.append(
                    f"{node}: {self.host_need / GiB:.0f} GiB host RAM for {self.ranks_per_node} ranks' "
                    f"weights (loaded on the host first) > {available / GiB:.0f} GiB available"
                )
        return found

    def lines(self) -> list[str]:
        hosts = (
            ", ".join(f"{n} {a / GiB:.0f} GiB" if a is not None else f"{n} not probed" for n, a in self.hosts.items())
            or "not probed"
        )
        return [
            f"HBM per card: {self.card_need / GiB:.1f} GiB needed of {self.card_budget / GiB:.1f} GiB usable "
            f"({self.card_bytes / GiB:.0f} GiB x {HBM_UTILIZATION})",
            f"host RAM per node: {self.host_need / GiB:.0f} GiB needed ({self.ranks_per_node} ranks x "
            f"{self.weights_bytes / self.tp_size / GiB:.1f} GiB, weights load on the host first); "
            f"available: {hosts}",
        ]


def serve_fit(
    model_dir: Path, route: Route, *, tp_size: int, moe: bool, card_bytes: int, host_available: int | None
) -> Fit:
    """INC QUANTIZE at load on one node: MoE experts go to the cards in BF16 before INC converts them
    (vllm-gaudi stages them first), dense BF16 layers are converted on the host (half the bytes on the card)."""
    share = 0.5 if route.name == "bf16" and not moe else 1.0
    return Fit(checkpoint_bytes(model_dir, route), tp_size, tp_size, card_bytes, {"this node": host_available}, share)


def checkpoint_bytes(model_dir: Path, route: Route) -> int:
    """Bytes of the weights as stored (headers), or a config estimate; an FP8 checkpoint holds ~1 byte per weight."""
    from ray_calib.engine.memory import weights_bytes

    estimate = weights_bytes(model_dir)
    if route.name == "fp8-checkpoint" and not any(Path(model_dir).glob("*.safetensors")):
        return estimate // 2  # the estimate counts bf16 (2 bytes per weight)
    return estimate


def check_fit(fit: Fit, route: Route, candidates: list[int], total_devices: int | None) -> None:
    """Refuse a plan that cannot fit, naming what would (a larger TP, or the FP8 checkpoint)."""
    problems = fit.problems()
    if not problems:
        return
    fixes = []
    larger = [
        tp
        for tp in sorted(candidates)
        if tp > fit.tp_size
        and (total_devices is None or tp <= total_devices)
        and Fit(
            fit.weights_bytes, tp, min(fit.ranks_per_node, tp), fit.card_bytes, fit.hosts, fit.card_share
        ).problems()
        == []
    ]
    if larger:
        fixes.append(f"--tp {larger[0]}")
    if route.name == "bf16":
        fixes.append("the FP8 checkpoint (half the bytes; pass it instead of the BF16 copy)")
    fix = "use " + " or ".join(fixes) + "." if fixes else "use more cards/nodes (ray-calib up) or a smaller model."
    raise EngineError(f"the model does not fit at TP {fit.tp_size} on Gaudi: " + "; ".join(problems), fix=fix)
