"""Will the model fit at this TP? Checked before any process starts (the seeds' PT_DEVMEM trap).

Need per device = weights/TP + KV cache + runtime overhead. On an accelerator that must fit one device
(times vLLM's memory utilisation); on CPU all ranks of a node share its RAM, so the node's ranks
together must fit what the host has available. The weights are summed from the safetensors headers,
or estimated from config.json when there are none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ray_calib.engine.device import GiB
from ray_calib.errors import EngineError, ModelError

CPU_RANK_OVERHEAD = int(0.6 * GiB)  # measured here: one vLLM CPU worker without weights or KV cache
GPU_RESERVE = 1 * GiB  # activations, CUDA/HPU graphs, allocator slack
GPU_UTILIZATION = 0.9  # vLLM's default gpu_memory_utilization


@dataclass(frozen=True)
class MemoryPlan:
    weights_bytes: int
    tp_size: int
    ranks_per_node: int
    need_per_rank: int
    budget_per_rank: int

    @property
    def fits(self) -> bool:
        return self.need_per_rank <= self.budget_per_rank


def plan(weights_bytes: int, tp_size: int, *, device: str, device_bytes: int, kv_bytes: int,
         ranks_per_node: int) -> MemoryPlan:
    if device == "cpu":
        need = weights_bytes // tp_size + kv_bytes + CPU_RANK_OVERHEAD
        budget = device_bytes // max(ranks_per_node, 1)
    else:
        need = weights_bytes // tp_size + kv_bytes + GPU_RESERVE
        budget = int(device_bytes * GPU_UTILIZATION)
    return MemoryPlan(weights_bytes, tp_size, ranks_per_node, need, budget)


def check_fits(model_dir: Path, tp_size: int, candidates: list[int], *, device: str, device_bytes: int,
               kv_bytes: int, devices_per_node: int | None) -> MemoryPlan:
    """Refuse a TP that cannot fit, naming the smallest candidate TP that does (or the shortfall)."""
    weights = weights_bytes(model_dir)

    def plan_for(tp: int) -> MemoryPlan:
        per_node = min(tp, devices_per_node) if devices_per_node else tp
        return plan(weights, tp, device=device, device_bytes=device_bytes, kv_bytes=kv_bytes, ranks_per_node=per_node)

    chosen = plan_for(tp_size)
    if chosen.fits:
        return chosen
    fitting = [tp for tp in sorted(candidates) if plan_for(tp).fits]
    where = "of host memory per rank" if device == "cpu" else f"of {device} memory per device"
    head = (f"TP {tp_size} needs {chosen.need_per_rank / GiB:.1f} GiB per rank (weights {weights / GiB:.1f} GiB / "
            f"{tp_size} + KV cache {kv_bytes / GiB:.1f} GiB + overhead) but has {chosen.budget_per_rank / GiB:.1f} GiB "
            f"{where}")
    if fitting:
        raise EngineError(head, fix=f"use --tp {fitting[0]} (the smallest TP that fits).")
    raise EngineError(head, fix="no TP this model allows fits here: add nodes/devices (ray-calib up) or a larger machine.")


def weights_bytes(model_dir: Path) -> int:
    """Bytes of all tensors in the checkpoint's safetensors files (header only), else a config estimate."""
    if any(Path(model_dir).glob("*.safetensors")):
        from ray_calib.convert.checkpoint import Checkpoint

        return Checkpoint.open(model_dir).nbytes
    return _estimate_from_config(Path(model_dir) / "config.json")


def _estimate_from_config(config_path: Path) -> int:
    """bf16 bytes of a decoder-only transformer described by config.json (attention + MLP/MoE + embeddings)."""
    from ray_calib.convert.checkpoint import model_config, num_routed_experts

    config = model_config(config_path.parent)
    config = config.get("text_config", config)  # multimodal configs nest the language model's
    if "hidden_size" not in config or "num_hidden_layers" not in config:
        raise ModelError(f"{config_path}: has no safetensors beside it and no hidden_size/num_hidden_layers to "
                         "estimate the weights from", fix="convert the checkpoint to safetensors.")
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
