"""Planning `quantize` on a DeepSeek-R1-sized checkpoint: open the index and headers, build the plan, lay out shards.

    python benchmarks/bench_plan.py [--repeat 5] [--tmp DIR]

The checkpoint is synthetic but shaped like DeepSeek-R1 in BF16: 61 layers (the first 3 dense), MLA
attention, 256 routed experts and one shared expert per MoE layer, 163 shards listed in
model.safetensors.index.json. Shards hold only their safetensors header; their data is a sparse hole
(the real sizes, ~1.3 TB, cost no disk). The measurement is a TP1 rank file keyed by vLLM module names
(fused qkv_a / gate_up, the MoE op and its w13_list/w2_list children, MLA attention). Target: <= 2 s
for the whole planning (what every quantize, resumes included, runs before its first byte).
Each repetition runs in a fresh process (no warm caches inside Python); the header files stay in the
page cache, as they do for a rerun of quantize.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 2.0
LAYERS, DENSE, EXPERTS, SHARDS = 61, 3, 256, 163
HIDDEN, INTER, MOE_INTER, VOCAB, HEADS = 7168, 18432, 2048, 129280, 128
Q_LORA, KV_LORA, NOPE, ROPE, V_HEAD = 1536, 512, 128, 64, 128


def r1_tensors() -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every BF16 DeepSeek-R1 tensor (without the MTP layer), in checkpoint order."""
    tensors = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        tensors += [
            (f"{p}.input_layernorm.weight", (HIDDEN,)),
            (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
            (f"{p}.self_attn.q_a_proj.weight", (Q_LORA, HIDDEN)),
            (f"{p}.self_attn.q_a_layernorm.weight", (Q_LORA,)),
            (f"{p}.self_attn.q_b_proj.weight", (HEADS * (NOPE + ROPE), Q_LORA)),
            (f"{p}.self_attn.kv_a_proj_with_mqa.weight", (KV_LORA + ROPE, HIDDEN)),
            (f"{p}.self_attn.kv_a_layernorm.weight", (KV_LORA,)),
            (f"{p}.self_attn.kv_b_proj.weight", (HEADS * (NOPE + V_HEAD), KV_LORA)),
            (f"{p}.self_attn.o_proj.weight", (HIDDEN, HEADS * V_HEAD)),
        ]
        if layer < DENSE:
            tensors += _mlp(f"{p}.mlp", INTER)
            continue
        tensors += [(f"{p}.mlp.gate.weight", (EXPERTS, HIDDEN)), (f"{p}.mlp.gate.e_score_correction_bias", (EXPERTS,))]
        tensors += _mlp(f"{p}.mlp.shared_experts", MOE_INTER)
        for expert in range(EXPERTS):
            tensors += _mlp(f"{p}.mlp.experts.{expert}", MOE_INTER)
    return tensors + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def _mlp(prefix: str, inter: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (f"{prefix}.gate_proj.weight", (inter, HIDDEN)),
        (f"{prefix}.up_proj.weight", (inter, HIDDEN)),
        (f"{prefix}.down_proj.weight", (HIDDEN, inter)),
    ]


def write_checkpoint(path: Path) -> int:
    """Header-only shards (sparse data) plus index and config; returns the number of tensors."""
    tensors = r1_tensors()
    path.mkdir(parents=True)
    per_shard = -(-len(tensors) // SHARDS)
    weight_map = {}
    for index in range(SHARDS):
        shard = f"model-{index + 1:05d}-of-{SHARDS:06d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in tensors[index * per_shard : (index + 1) * per_shard]:
            nbytes = 2 * _numel(shape)
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = shard
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path / shard, "wb") as handle:
            handle.write(struct.pack("<Q", len(raw)) + raw)
            handle.truncate(8 + len(raw) + offset)  # a hole: no blocks allocated
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "first_k_dense_replace": DENSE,
        "n_routed_experts": EXPERTS,
        "num_attention_heads": HEADS,
        "kv_lora_rank": KV_LORA,
        "q_lora_rank": Q_LORA,
        "vocab_size": VOCAB,
    }
    (path / "config.json").write_text(json.dumps(config))
    return len(tensors)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def measurement_nodes() -> dict:
    """TP1 ranges keyed by vLLM module names, one node per fused group (what `measure` + `unify` write)."""
    leaf = [[1.0]]
    nodes: dict = {}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        for module in ("self_attn.fused_qkv_a_proj", "self_attn.q_b_proj", "self_attn.kv_b_proj", "self_attn.o_proj"):
            nodes[f"{p}.{module}"] = {"inputs": [leaf], "params": {"weight": leaf}}
        nodes[f"{p}.self_attn.mla_attn"] = {"inputs": [leaf, leaf, leaf]}
        mlps = [f"{p}.mlp"] if layer < DENSE else [f"{p}.mlp.shared_experts"]
        for mlp in mlps:
            nodes[f"{mlp}.gate_up_proj"] = {"inputs": [leaf], "params": {"weight": leaf}}
            nodes[f"{mlp}.down_proj"] = {"inputs": [leaf], "params": {"weight": leaf}}
        if layer >= DENSE:
            op = f"{p}.mlp.experts"
            nodes[op] = {"inputs": [leaf], "outputs": [leaf] + [leaf] * EXPERTS}
            for expert in range(EXPERTS):
                nodes[f"{op}.w13_list.{expert}"] = {"inputs": [[[0.0]]], "params": {"weight": leaf}}
                nodes[f"{op}.w2_list.{expert}"] = {"inputs": [[[0.0]]], "params": {"weight": leaf}}
    return nodes


def child(model: str, nodes_path: str) -> None:
    """One planning run, timed per stage; prints a JSON line."""
    started = time.perf_counter()
    sys.path.insert(0, str(REPO))
    # imported here: the child reports how long importing the quantize path takes ("imports")
    from ray_calib.convert.plan import build_plan  # noqa: PLC0415
    from ray_calib.convert.quantize import QuantizeJob, _layout  # noqa: PLC0415
    from ray_calib.inc import RankFile, StatsName  # noqa: PLC0415
    from ray_calib.inc.devices import get_device  # noqa: PLC0415
    from ray_calib.inc.methods import get_method  # noqa: PLC0415
    from ray_calib.model.checkpoint import Checkpoint  # noqa: PLC0415

    imported = time.perf_counter()
    measurement = RankFile(name=StatsName("inc_measure_output"), nodes=json.loads(Path(nodes_path).read_text()))
    loaded = time.perf_counter()
    checkpoint = Checkpoint.open(model)
    opened = time.perf_counter()
    plan = build_plan(checkpoint, measurement, fp8_kv=False)
    planned = time.perf_counter()
    job = QuantizeJob(
        model=Path(model),
        measurement=measurement,
        out=Path(model) / "unused",
        method=get_method("maxabs_arbitrary"),
        device=get_device("cpu"),
    )
    layouts = {shard: _layout(checkpoint, shard, plan, job) for shard in checkpoint.shards}
    laid_out = time.perf_counter()
    print(
        json.dumps(
            {
                "imports": imported - started,
                "read_nodes": loaded - imported,
                "open": opened - loaded,
                "plan": planned - opened,
                "layout": laid_out - planned,
                "tensors": len(checkpoint.tensors),
                "groups": len(plan.groups),
                "planned_tensors": sum(map(len, layouts.values())),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tmp", type=Path, default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-plan-", dir=args.tmp))
    try:
        count = write_checkpoint(tmp / "r1")
        (tmp / "nodes.json").write_text(json.dumps(measurement_nodes()))
        runs = []
        for _ in range(args.repeat):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(tmp / "r1"), str(tmp / "nodes.json")],
                capture_output=True,
                text=True,
            )
            if proc.returncode:
                sys.exit(f"planning failed:\n{proc.stderr[-3000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stages = ("open", "plan", "layout")
    totals = [sum(r[s] for s in stages) for r in runs]
    median = statistics.median(totals)
    print(
        f"planning a DeepSeek-R1-sized checkpoint ({count} tensors in {SHARDS} shards, {runs[0]['groups']} fused "
        f"groups, {runs[0]['planned_tensors']} output tensors), {args.repeat} fresh processes, "
        f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    for stage in stages:
        values = [r[stage] for r in runs]
        print(f"  {stage:<7} median {statistics.median(values):6.3f} s  (min {min(values):.3f}, max {max(values):.3f})")
    spread = (max(totals) - min(totals)) / median
    print(
        f"  total   median {median:6.3f} s  (min {min(totals):.3f}, max {max(totals):.3f}, spread {spread:.1%}); "
        f"target <= {TARGET_S} s: {'MET' if median <= TARGET_S else 'MISSED'} ({median / TARGET_S:.2f}x the target)"
    )


if __name__ == "__main__":
    main()
