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

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ray_calib.engine.device import GiB
from ray_calib.engine.launch import timeout_env
from ray_calib.engine.memory import weights_bytes
from ray_calib.errors import EngineError, ModelError

MEASURE_ENV = {"PT_HPU_WEIGHT_SHARING": "0", "VLLM_SKIP_WARMUP": "true"}
GRAPH_RESERVED_MEM = 0.1  # VLLM_GRAPH_RESERVED_MEM: share of the HBM left after the weights kept for HPU graphs
SERVE_ENV = {"PT_HPU_WEIGHT_SHARING": "0", "VLLM_GRAPH_RESERVED_MEM": str(GRAPH_RESERVED_MEM)}
LAZY_COLLECTIVES = {"PT_HPU_ENABLE_LAZY_COLLECTIVES": "true"}  # needed by HPU graphs at TP > 1
FP8_CHECKPOINT_ENV = {"VLLM_HPU_FORCE_CHANNEL_FP8": "0"}  # keep block scales; INC handles the FP8 weights
HBM_UTILIZATION = 0.9  # vLLM's gpu_memory_utilization default
HBM_RESERVE = 1 * GiB  # activations, HPU graphs, allocator slack


COMPRESSED_TENSORS = "compressed-tensors"


@dataclass(frozen=True)
class Route:
    name: str  # "bf16" | "fp8-checkpoint" | "compressed-tensors"
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
    if method == "compressed-tensors":
        return Route(
            COMPRESSED_TENSORS,
            None,
            {},
            "compressed-tensors FP8 checkpoint (ray-calib quantize --format compressed-tensors): vllm-gaudi's own "
            "loader, no INC and no QUANT_CONFIG",
        )
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
    *,
    measure: bool,
    tp_size: int,
    route: Route,
    quant_config: str | None,
    timeout_s: int,
    expert_parallel: bool = False,
    ready_timeout_s: int | None = None,
    skip_warmup: bool = False,
) -> dict[str, str]:
    """Every variable the ranks need, in the order they are documented above.

    VLLM_EP_SIZE is what the HabanaAI vLLM fork reads for expert parallelism; vllm-gaudi reads the
    engine argument `enable_expert_parallel` (both are set, each stack ignores the other).
    """
    env = {"QUANT_CONFIG": quant_config} if quant_config else {}  # none for a compressed-tensors checkpoint
    env.update(MEASURE_ENV if measure else SERVE_ENV)
    if skip_warmup:
        env["VLLM_SKIP_WARMUP"] = "true"
    if tp_size > 1:
        env.update(LAZY_COLLECTIVES)
    if expert_parallel:
        env["VLLM_EP_SIZE"] = str(tp_size)
    env.update(route.env)
    env.update(timeout_env(timeout_s, ready_timeout_s))
    return env


@dataclass
class Fit:
    """Weights per card and per host for one TP on Gaudi, and what each has; serving adds the KV cache.

    Serving (`kv` set) follows vllm-gaudi's hpu_worker: the weights and the profile run's workspace take what
    they take, then of the HBM still free `gpu_memory_utilization` is usable, VLLM_GRAPH_RESERVED_MEM of that
    goes to HPU graphs and the rest to the KV cache. A server starts only if one sequence of max_model_len
    fits in it. Without `kv` (measuring) the weights must fit in HBM x utilization, as before.
    """

    weights_bytes: int
    tp_size: int
    ranks_per_node: int
    card_bytes: int  # HBM of one card
    hosts: dict[str, int | None] = field(default_factory=dict)  # node -> MemAvailable (None: not probed)
    card_share: float = 1.0  # share of a rank's weights on its card at the peak (0.5: FP8-converted on the host)
    utilization: float = HBM_UTILIZATION  # gpu_memory_utilization
    kv: KvNeed | None = None  # serving: the KV cache one full-length sequence needs per card

    @property
    def card_need(self) -> int:
        return int(self.weights_bytes // self.tp_size * self.card_share) + HBM_RESERVE

    @property
    def card_budget(self) -> int:
        """HBM the weights and activations may take."""
        return self.card_bytes if self.kv else int(self.card_bytes * self.utilization)

    @property
    def usable_after_load(self) -> int:
        return int(max(0, self.card_bytes - self.card_need) * self.utilization)

    @property
    def graph_reserve(self) -> int:
        return int(self.usable_after_load * GRAPH_RESERVED_MEM) if self.kv else 0

    @property
    def kv_room(self) -> int:
        """KV-cache bytes per card: the usable HBM after the load, less the graph reserve."""
        return self.usable_after_load - self.graph_reserve

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
        if self.kv and self.card_need <= self.card_budget and self.kv.sequence_bytes > self.kv_room:
            found.append(
                f"the KV cache of one {self.kv.context}-token sequence needs {self.kv.sequence_bytes / GiB:.1f} GiB "
                f"per card, {self.kv_room / GiB:.1f} GiB are left after the weights, activations, "
                f"gpu_memory_utilization {self.utilization} and the graph reserve"
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
        card = [
            f"HBM per card: {self.card_need / GiB:.1f} GiB needed of {self.card_budget / GiB:.1f} GiB usable "
            f"({self.card_bytes / GiB:.0f} GiB x {self.utilization})"
        ]
        if self.kv:
            fits = self.kv_room // max(1, self.kv.sequence_bytes)
            card = [
                f"HBM per card {self.card_bytes / GiB:.0f} GiB: weights {self.card_need / GiB - HBM_RESERVE / GiB:.1f}"
                f" GiB + activations {HBM_RESERVE / GiB:.0f} GiB; of the rest x {self.utilization} "
                f"(gpu_memory_utilization): graph reserve {self.graph_reserve / GiB:.1f} GiB "
                f"(VLLM_GRAPH_RESERVED_MEM {GRAPH_RESERVED_MEM}) + KV cache {self.kv_room / GiB:.1f} GiB",
                f"KV cache: {self.kv.token_bytes / 1024:.1f} KiB per token per card ({self.kv.dtype}); one "
                f"{self.kv.context}-token sequence {self.kv.sequence_bytes / GiB:.2f} GiB; room for {fits} such "
                f"sequences (max_num_seqs {self.kv.max_num_seqs})",
            ]
        return [
            *card,
            f"host RAM per node: {self.host_need / GiB:.0f} GiB needed ({self.ranks_per_node} ranks x "
            f"{self.weights_bytes / self.tp_size / GiB:.1f} GiB, weights load on the host first); "
            f"available: {hosts}",
        ]


def serve_fit(
    model_dir: Path,
    route: Route,
    *,
    tp_size: int,
    moe: bool,
    card_bytes: int,
    host_available: int | None,
    kv: KvNeed | None = None,
) -> Fit:
    """INC QUANTIZE at load on one node: MoE experts go to the cards in BF16 before INC converts them
    (vllm-gaudi stages them first), dense BF16 layers are converted on the host (half the bytes on the card)."""
    share = 0.5 if route.name == "bf16" and not moe else 1.0
    utilization = serve_memory_utilization(kv.context) if kv else HBM_UTILIZATION
    return Fit(
        checkpoint_bytes(model_dir, route),
        tp_size,
        tp_size,
        card_bytes,
        {"this node": host_available},
        share,
        utilization,
        kv,
    )


# ---- serving: a bounded context, the KV cache it needs, and how long start-up may take -------------------

# the HabanaAI fork's DeepSeek-R1 quickstart (scripts/quickstart/start_vllm.sh): max_model_len 16384 ("maximal
# value for single node: 32768"), max_num_seqs 64, max_num_batched_tokens = max_model_len, utilization 0.85 up
# to 18432 tokens and 0.65 above, VLLM_GRAPH_RESERVED_MEM 0.1, warm-up on with an HPU recipe cache
SERVE_CONTEXT = 16384
SERVE_MAX_NUM_SEQS = 64
_LONG_CONTEXT = 18432


def serve_memory_utilization(context: int) -> float:
    return 0.85 if context <= _LONG_CONTEXT else 0.65


@dataclass(frozen=True)
class KvNeed:
    token_bytes: int  # KV-cache bytes per token on one card
    context: int  # max_model_len
    max_num_seqs: int
    dtype: str  # "fp8_inc" | "bf16"

    @property
    def sequence_bytes(self) -> int:
        return self.token_bytes * self.context


def kv_need(config: dict, tp_size: int, fp8: bool, context: int, max_num_seqs: int | None = None) -> KvNeed:
    """What one `context`-token sequence of this model needs in the KV cache per card at `tp_size`."""
    return KvNeed(
        kv_token_bytes(config, tp_size, fp8),
        context,
        max_num_seqs or SERVE_MAX_NUM_SEQS,
        "fp8_inc" if fp8 else "bf16",
    )


def kv_token_bytes(config: dict, tp_size: int, fp8: bool) -> int:
    """KV-cache bytes per token per card. MLA keeps one latent (kv_lora_rank + rope dims) per layer on every
    rank; other attention splits its KV heads over the ranks (at least one each)."""
    text = config.get("text_config") or config
    width = 1 if fp8 else 2
    layers = int(text.get("num_hidden_layers", 0))
    if text.get("kv_lora_rank"):
        return layers * (int(text["kv_lora_rank"]) + int(text.get("qk_rope_head_dim", 0))) * width
    heads = int(text.get("num_attention_heads", 1))
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or int(text.get("hidden_size", 0)) // max(1, heads))
    return layers * 2 * max(1, kv_heads // tp_size) * head_dim * width


def serve_context(model_context: int | None, calibration_tokens: int | None, asked: int | None) -> tuple[int, str]:
    """(max_model_len, why): what was asked, else 16384 (never below the calibration length), capped by the model."""
    if asked is not None:
        return asked, "--max-model-len"
    context = max(SERVE_CONTEXT, calibration_tokens or 0)
    if model_context and model_context < context:
        return model_context, f"the model's context {model_context}"
    why = (
        f"the calibration length {calibration_tokens}"
        if context > SERVE_CONTEXT
        else f"the upstream DeepSeek-R1 quickstart's {SERVE_CONTEXT}"
    )
    return context, why + (f"; the model allows {model_context}, --max-model-len for more" if model_context else "")


STARTUP_BASE_S = 600  # engine processes, HCCL set-up, INC's conversion of the loaded weights
WARMUP_S = 1200  # HPU graph warm-up over the prompt/decode buckets up to max_model_len and max_num_seqs
DEFAULT_READ_BYTES_S = 500 * 1000**2  # when the read speed cannot be measured


def startup_wait_s(weights_bytes: int, read_bytes_s: float, *, warmup: bool) -> int:
    """How long `infer --serve` waits for /health: reading the checkpoint on the host (vllm-gaudi loads weights
    there first with INC) and moving it to the cards (counted as a second pass), the fixed start-up costs and
    the warm-up. Separate from --timeout, which bounds one engine step."""
    return int(STARTUP_BASE_S + 2 * weights_bytes / max(read_bytes_s, 1.0) + (WARMUP_S if warmup else 0))


def host_read_bytes_s(model_dir: Path, sample_bytes: int = 256 << 20) -> tuple[float, str]:
    """(bytes per second, how it was found): a timed read of up to `sample_bytes` of the largest shard (the
    page cache may make it optimistic for a file read recently), else a conservative default."""
    shards = sorted(Path(model_dir).glob("*.safetensors"), key=lambda p: p.stat().st_size)
    if not shards or shards[-1].stat().st_size < 16 << 20:
        return DEFAULT_READ_BYTES_S, f"default {DEFAULT_READ_BYTES_S / 1e9:.1f} GB/s (no shard to time)"
    started, done = time.perf_counter(), 0
    with open(shards[-1], "rb", buffering=0) as handle:
        while done < sample_bytes and (chunk := handle.read(16 << 20)):
            done += len(chunk)
    rate = done / max(time.perf_counter() - started, 1e-6)
    return rate, f"{rate / 1e9:.1f} GB/s measured on {done >> 20} MiB of {shards[-1].name}"


def checkpoint_bytes(model_dir: Path, route: Route) -> int:
    """Bytes of the weights as stored (headers), or a config estimate; an FP8 checkpoint holds ~1 byte per weight."""
    estimate = weights_bytes(model_dir)
    if route.name in ("fp8-checkpoint", COMPRESSED_TENSORS) and not any(Path(model_dir).glob("*.safetensors")):
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
        and replace(fit, tp_size=tp, ranks_per_node=min(fit.ranks_per_node, tp)).problems() == []
    ]
    if larger:
        fixes.append(f"--tp {larger[0]}")
    if route.name == "bf16":
        fixes.append("the FP8 checkpoint (half the bytes; pass it instead of the BF16 copy)")
    fix = "use " + " or ".join(fixes) + "." if fixes else "use more cards/nodes (ray-calib up) or a smaller model."
    raise EngineError(f"the model does not fit at TP {fit.tp_size} on Gaudi: " + "; ".join(problems), fix=fix)
