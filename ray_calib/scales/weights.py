"""`scales --weights`: weight scales from each rank's own shard of the checkpoint tensors, as INC computes them.

INC takes a linear layer's weight scale from `mod.weight` at QUANTIZE time: on rank r of a TP=W run that
is rank r's shard, dequantized first if it is FP8. vLLM's tensor-parallel layout decides the shard:
    row-parallel (o_proj, down_proj, an expert's w2)           columns [r*in/W, (r+1)*in/W)
    replicated (q_a_proj, kv_a_proj_with_mqa, the MoE router)  the whole tensor
    lm_head (ParallelLMHead)                                   vocab rows padded to 64, split W ways
    qkv_proj                                                   q rows split W ways; k/v rows split by KV head,
                                                               one head per rank group when heads < W
    anything else (column-parallel: q_b_proj, kv_b_proj,       rows [r*out/W, (r+1)*out/W), each fused member
      gate_up_proj, an expert's w13)                            (q/k/v, gate/up) split on its own
Experts: with expert parallelism (local experts x W = routed experts) rank r holds whole experts
r*E .. r*E+E-1, and `<op>.w13_list.K` is global expert r*E+K; without it every rank holds every expert,
sharded like the dense MLP. A fused module's members share one per-tensor scale (their max).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ray_calib.errors import ModelError
from ray_calib.inc import RankFile, expert_layout
from ray_calib.inc.devices import DeviceScales
from ray_calib.inc.methods import ScaleMethod, WeightScaleSearch, channel_scales
from ray_calib.model import names
from ray_calib.model.checkpoint import Checkpoint
from ray_calib.model.config import num_routed_experts
from ray_calib.model.names import expert_child
from ray_calib.model.safetensors_io import ShardReader
from ray_calib.scales.ops import WeightScale

ROW_PARALLEL = frozenset({"o_proj", "down_proj", "out_proj", "dense_4h_to_h"})
REPLICATED = frozenset({"q_a_proj", "kv_a_proj_with_mqa", "fused_qkv_a_proj", "gate"})
_EXPERT_PARTS = {"w13_list": ("gate_proj", "up_proj"), "w2_list": ("down_proj",)}
VOCAB_PADDING = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE


@dataclass(frozen=True)
class Shard:
    tensor: str  # checkpoint tensor name
    rows: tuple[int, int] | None = None  # None: all
    cols: tuple[int, int] | None = None


class CheckpointWeights:
    """Reads each rank's shards from a checkpoint; `for_rank(rank_file)` is the per-rank weight source."""

    def __init__(
        self, weights_dir: Path, method: ScaleMethod, device: DeviceScales, *, search_device: DeviceScales | None = None
    ) -> None:
        self.checkpoint = Checkpoint.open(weights_dir)
        self.method, self.device, self.search_device = method, device, search_device
        self._readers: dict[str, object] = {}

    def for_rank(self, rank_file: RankFile) -> Callable[[str, dict], WeightScale | None]:
        rank, world = rank_file.name.rank or 0, rank_file.name.world_size or 1
        local_experts = expert_layout(rank_file).local_experts

        def scale(module: str, node: dict) -> WeightScale | None:
            shards = rank_shards(module, self.checkpoint.config, self.checkpoint.tensors, rank, world, local_experts)
            return None if shards is None else self.weight_scale(shards)

        return scale

    def weight_scale(self, shards: list[Shard]) -> WeightScale:
        search = WeightScaleSearch(self.method, self.device, search_device=self.search_device)
        rows: list[float] = []
        in_features = None
        for shard in shards:
            weight = self.read(shard)
            if self.method.per_channel_weights:
                rows += channel_scales(weight, self.method, self.device).tolist()
                in_features = int(weight.shape[1])
            else:
                search.add(weight)
        if self.method.per_channel_weights:
            return WeightScale(rows, in_features)
        value = search.scale()
        return WeightScale([value] if self.method.weight.value == "opt" else value)

    def read(self, shard: Shard):
        """The shard as a bf16 (or the checkpoint's float) tensor; FP8 weights dequantized first, as INC does."""
        weight = self._tensor(shard.tensor)
        if weight.dtype.is_floating_point and weight.element_size() == 1:
            weight = self._dequantize(shard.tensor, weight)
        if shard.rows:
            weight = weight[shard.rows[0] : shard.rows[1]]
        if shard.cols:
            weight = weight[:, shard.cols[0] : shard.cols[1]]
        return weight

    def _tensor(self, name: str):
        file = self.checkpoint.shard_of[name]
        with ShardReader(self.checkpoint.path / file) as reader:
            return reader.read(name)

    def _dequantize(self, name: str, weight):
        """Block FP8 (`weight_scale_inv`, DeepSeek) or per-tensor/channel FP8 (`weight_scale`) -> bf16."""
        import torch

        base = name[: -len(".weight")] if name.endswith(".weight") else name
        tensors = self.checkpoint.tensors
        if f"{name}_scale_inv" in tensors:
            scale = self._tensor(f"{name}_scale_inv").float()
            block = tuple(
                (self.checkpoint.config.get("quantization_config") or {}).get("weight_block_size") or (128, 128)
            )
            rows, cols = weight.shape
            scale = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
        elif f"{base}.weight_scale" in tensors:
            scale = self._tensor(f"{base}.weight_scale").float()
            scale = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(())
        else:
            raise ModelError(
                f"{self.checkpoint.path}: FP8 tensor '{name}' has no weight_scale_inv or weight_scale",
                fix="pass the BF16 model (ray-calib convert-bf16) or a block/compressed-tensors FP8 one.",
            )
        return (weight.float() * scale).to(torch.bfloat16)


def rank_shards(
    module: str, config: dict, tensors: dict, rank: int, world: int, local_experts: int
) -> list[Shard] | None:
    """The checkpoint slices rank `rank` of `world` holds for vLLM module `module`; None if not in the checkpoint."""
    child = expert_child(module)
    if child:
        return _expert_shards(child, config, tensors, rank, world, local_experts, num_routed_experts(config))
    members = [f"{prefix}.weight" for prefix in names.checkpoint_modules(module)]
    if not all(m in tensors for m in members):
        return None
    leaf = module.rsplit(".", 1)[-1]
    if world == 1 or leaf in REPLICATED:
        return [Shard(m) for m in members]
    if leaf in ROW_PARALLEL:
        return [Shard(m, cols=_split(tensors[m].shape[1], rank, world, m)) for m in members]
    if leaf == "lm_head":
        vocab = tensors[members[0]].shape[0]
        per = -(-vocab // VOCAB_PADDING) * VOCAB_PADDING // world
        return [Shard(members[0], rows=(min(rank * per, vocab), min((rank + 1) * per, vocab)))]
    if leaf == "qkv_proj":
        return _qkv_shards(members, config, tensors, rank, world)
    return [Shard(m, rows=_split(tensors[m].shape[0], rank, world, m)) for m in members]


def _expert_shards(
    child: tuple[str, str, int], config: dict, tensors: dict, rank: int, world: int, local_experts: int, total: int
) -> list[Shard] | None:
    op, kind, expert = child
    expert_parallel = world > 1 and local_experts * world == total and local_experts != total
    global_expert = expert + rank * local_experts if expert_parallel else expert
    members = [f"{prefix}.weight" for prefix in names.checkpoint_modules(f"{op}.{kind}.{global_expert}")]
    if not all(m in tensors for m in members):
        return None
    if expert_parallel or world == 1:
        return [Shard(m) for m in members]
    if kind == "w2_list":
        return [Shard(m, cols=_split(tensors[m].shape[1], rank, world, m)) for m in members]
    return [Shard(m, rows=_split(tensors[m].shape[0], rank, world, m)) for m in members]


def _qkv_shards(members: list[str], config: dict, tensors: dict, rank: int, world: int) -> list[Shard]:
    """vLLM QKVParallelLinear: query heads split evenly; KV heads split, or replicated when fewer than ranks."""
    q, k, v = members
    heads = int(config.get("num_attention_heads") or 0)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = tensors[q].shape[0] // heads if heads else 0
    shards = [Shard(q, rows=_split(tensors[q].shape[0], rank, world, q))]
    for name in (k, v):
        if kv_heads >= world:
            shards.append(Shard(name, rows=_split(tensors[name].shape[0], rank, world, name)))
        else:
            if not head_dim or world % kv_heads:
                raise ModelError(
                    f"{name}: {kv_heads} KV heads cannot be replicated over {world} ranks",
                    fix="check num_key_value_heads in config.json and the TP size of the run.",
                )
            head = rank // (world // kv_heads)
            shards.append(Shard(name, rows=(head * head_dim, (head + 1) * head_dim)))
    return shards


def _split(size: int, rank: int, world: int, tensor: str) -> tuple[int, int]:
    if size % world:
        raise ModelError(
            f"{tensor}: dimension {size} does not split over {world} ranks",
            fix="the run's TP size does not fit this checkpoint: pass the model that was measured.",
        )
    per = size // world
    return rank * per, (rank + 1) * per
