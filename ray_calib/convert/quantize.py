"""`ray-calib quantize`: a BF16 checkpoint + measurements -> an FP8 checkpoint vLLM loads.

The same writer makes the CPU/CUDA checkpoint (full scale 448, any float scale) and the Gaudi one
vllm-gaudi loads as compressed-tensors (`job.device` gaudi2/gaudi3: full scale 240/448, INC's HW-aligned
scales, `fp8_dtype_flavor` on Gaudi2 so the loader does not rescale them).

    1. check    model is BF16 safetensors, measurements complete, names match, disk has room
    2. scales   weight scale per fused group (streamed, one tensor at a time), input/KV scales
    3. write    output shard i = input shard i with FP8 weights + weight_scale/input_scale, written
                by a streaming writer; each finished shard's sha256 goes into the manifest
    4. finish   config.json (quantization_config), model.safetensors.index.json, tokenizer files
A rerun with the same inputs skips shards whose file still has the recorded checksum (resumable).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from ray_calib import atomic
from ray_calib.convert import gptq
from ray_calib.convert.cast import Scratch, chunks, fp8_weight, stream, to_torch, weight_maxabs
from ray_calib.convert.plan import QuantPlan, build_plan
from ray_calib.convert.qconfig import GAUDI2_FP8_FLAVOR, compressed_tensors_config
from ray_calib.errors import DiskFullError, ModelError
from ray_calib.inc.devices import DeviceScales
from ray_calib.inc.methods import (
    ScaleMethod,
    TensorRule,
    WeightScaleSearch,
    activation_scale,
    channel_scales,
    leaf_max,
    scale_from_maxabs,
)
from ray_calib.inc.rankfile import RankFile
from ray_calib.measurements.hessians import Hessians
from ray_calib.model import names
from ray_calib.model.checkpoint import (
    Checkpoint,
    FreeSpace,
    check_free_space,
    clear_leftovers,
    copy_side_files,
    free_bytes,
    open_manifest,
    source_fingerprint,
    verified_shards,
    write_index,
)
from ray_calib.model.safetensors_io import PlannedTensor, ShardReader, ShardWriter, read_header
from ray_calib.ui import progress

MANIFEST = ".ray-calib-quantize.json"
KV_SHARD = "model-kv-scales.safetensors"
_FORMAT_VERSION = 1


@dataclass
class QuantizeJob:
    model: Path
    measurement: RankFile  # at TP1
    out: Path
    method: ScaleMethod
    device: DeviceScales
    fp8_kv: bool = False
    kv_rule: TensorRule | None = None  # k/v scales; None: the method's activation rule (INC's semantics)
    hessians: Hessians | None = None  # linear inputs' sum(x xᵀ): weights rounded by GPTQ (`convert.gptq`)
    low_cpu_mem: bool = False
    force: bool = False
    free_space: FreeSpace = free_bytes
    on_shard_done: Callable[[str], None] | None = None  # progress hook (tests interrupt here)


@dataclass
class QuantizeSummary:
    out: Path
    shards_written: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)
    quantized: int = 0
    kept: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "amax": 0.0, "cast": 0.0, "write": 0.0})
    filled_experts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gptq: int = 0  # weights rounded by GPTQ


def quantize_checkpoint(job: QuantizeJob) -> QuantizeSummary:
    checkpoint = Checkpoint.open(job.model)
    evidence = checkpoint.fp8_evidence()
    if evidence:
        raise ModelError(
            f"{job.model}: is already quantized ({evidence})",
            fix=f"convert it first: ray-calib convert-bf16 --in {job.model} --out {job.model}-bf16",
        )
    mla = "kv_lora_rank" in checkpoint.config
    # vllm-gaudi loads MLA latent-cache scales (k and v: one latent range); vLLM 0.32 loads none
    plan = build_plan(
        checkpoint,
        job.measurement,
        fp8_kv=job.fp8_kv and (not mla or job.device.is_gaudi),
        one_expert_input_scale=not job.device.is_gaudi,
    )
    summary = QuantizeSummary(out=job.out, filled_experts=plan.filled_experts, input_bytes=checkpoint.nbytes)
    if job.fp8_kv and mla and not job.device.is_gaudi:
        summary.notes.append(
            "MLA model: vLLM 0.32 loads no KV-cache scales for MLA from a checkpoint, so none were "
            "written (serve with --kv-cache-dtype fp8 and scale 1.0 on CUDA, or use INC on Gaudi)"
        )
    fingerprint = _fingerprint(checkpoint, job)
    manifest = open_manifest(job.out, MANIFEST, fingerprint, job.force, "a quantize run")
    done = verified_shards(job.out, manifest)
    if manifest.pop("kv_scale_value", None) is not None:  # set_kv_scales replaced them: the measured ones again
        done.discard(KV_SHARD)
    shard_names = [*checkpoint.shards, *([KV_SHARD] if plan.kv_maxabs else [])]
    layouts = {shard: _layout(checkpoint, shard, plan, job) for shard in shard_names}
    todo = [s for s in shard_names if s not in done]
    clear_leftovers(job.out)
    check_free_space(job.out, sum(sum(t.nbytes for t in layouts[s]) for s in todo), job.free_space)
    job.out.mkdir(parents=True, exist_ok=True)
    scales = manifest.setdefault("weight_scales", {})
    scratch = _scratch(checkpoint, plan, low_cpu_mem=job.low_cpu_mem, fullscale=job.device.fullscale)
    try:
        if not job.method.per_channel_weights and len(scales) < len(plan.group_of):
            scales.update(_group_weight_scales(checkpoint, plan, job, summary, scratch))
            atomic.write_json(job.out / MANIFEST, manifest)
        for shard in shard_names:
            if shard in done:
                summary.shards_skipped.append(shard)
                continue
            try:
                manifest["shards"][shard] = _write_shard(
                    checkpoint, shard, layouts[shard], plan, scales, job, summary, scratch
                )
            except DiskFullError as err:
                later = [s for s in shard_names[shard_names.index(shard) + 1 :] if s not in done]
                raise _disk_full(err, later, layouts) from None
            atomic.write_json(job.out / MANIFEST, manifest)
            summary.shards_written.append(shard)
            if job.on_shard_done:
                job.on_shard_done(shard)
    finally:
        scratch.close()
    _finish(checkpoint, layouts, job, fp8_kv=bool(plan.kv_maxabs))
    summary.quantized = len(plan.group_of)
    summary.kept = len(checkpoint.tensors) - summary.quantized
    summary.output_bytes = sum((job.out / s).stat().st_size for s in shard_names)
    return summary


def _disk_full(err: DiskFullError, later: list[str], layouts: dict[str, list[PlannedTensor]]) -> DiskFullError:
    """The shard that did not fit plus the shards still to write: what the disk must hold to finish."""
    rest = sum(t.nbytes for shard in later for t in layouts[shard])
    return DiskFullError(
        err.path,
        err.needed + rest,
        err.free,
        fix="free that much on its disk or choose another --out; the partial shard was removed and finished "
        "ones are kept: rerun the same command to go on",
    )


# ---- manifest (resume) ------------------------------------------------------------------------------------


def _fingerprint(checkpoint: Checkpoint, job: QuantizeJob) -> str:
    digest = hashlib.sha256(source_fingerprint(checkpoint).encode())
    digest.update(json.dumps(job.measurement.nodes, sort_keys=True).encode())
    digest.update(repr((job.method, job.device, job.fp8_kv, job.kv_rule, _FORMAT_VERSION)).encode())
    if job.hessians is not None:
        digest.update(f"gptq {job.hessians.tokens} {gptq.DAMP} {sorted(job.hessians.matrices)}".encode())
    return digest.hexdigest()


# ---- layout and scales ------------------------------------------------------------------------------------


def _layout(checkpoint: Checkpoint, shard: str, plan: QuantPlan, job: QuantizeJob) -> list[PlannedTensor]:
    if shard == KV_SHARD:
        return [PlannedTensor(name, "F32", (1,)) for layer in plan.kv_maxabs for name in names.kv_scale_names(layer)]
    layout = []
    for info in checkpoint.tensors_in(shard):
        if not plan.is_quantized(info.name):
            layout.append(PlannedTensor(info.name, info.dtype, info.shape))
            continue
        prefix = info.name.removesuffix(".weight")
        scale_shape = (info.shape[0], 1) if job.method.per_channel_weights else (1,)
        layout += [
            PlannedTensor(info.name, "F8_E4M3", info.shape),
            PlannedTensor(f"{prefix}.weight_scale", "F32", scale_shape),
        ]
        if not job.method.dynamic_only:
            layout.append(PlannedTensor(f"{prefix}.input_scale", "F32", (1,)))
    return layout


CAST_THREADS = 2  # np.take drops the GIL: the cast of one weight is split in two halves


def _scratch(checkpoint: Checkpoint, plan: QuantPlan, *, low_cpu_mem: bool, fullscale: float) -> Scratch:
    """Inputs mapped from the page cache (no copy), FP8 outputs written behind. With `low_cpu_mem` no
    tensor larger than the largest *quantized* weight is taken whole: larger unquantized ones (embeddings,
    lm_head) are copied in blocks, so memory stays a few times one weight whatever the checkpoint."""
    weights = [checkpoint.tensors[name] for name in plan.group_of]
    largest_weight = max((info.nbytes for info in weights), default=0)
    largest = max((info.nbytes for info in checkpoint.tensors.values()), default=0)
    return Scratch(
        largest_weight if low_cpu_mem else largest,
        max((info.numel for info in weights), default=0),
        read_ahead=True,
        cast_threads=CAST_THREADS,
        mapped=True,
        fullscale=fullscale,
    )


def _group_weight_scales(
    checkpoint: Checkpoint, plan: QuantPlan, job: QuantizeJob, summary: QuantizeSummary, scratch: Scratch
) -> dict[str, float]:
    """Pass 1: one per-tensor weight scale per fused group, reading one tensor at a time."""
    searches = [WeightScaleSearch(job.method, job.device) for _ in plan.groups]
    with progress("weight scales", len(plan.group_of), unit="tensors") as bar:
        for shard in checkpoint.shards:
            members = [i.name for i in checkpoint.tensors_in(shard) if plan.is_quantized(i.name)]
            with ShardReader(checkpoint.path / shard) as reader, closing(stream(reader, members, scratch)) as tensors:
                started = time.perf_counter()
                for name, raw in tensors:
                    assert raw is not None, "the scratch takes every quantized weight whole"
                    summary.seconds["read"] += time.perf_counter() - started
                    started = time.perf_counter()
                    search, info = searches[plan.group_of[name]], checkpoint.tensors[name]
                    if search.needs_tensor:
                        search.add(to_torch(raw, info))
                    else:
                        search.add_maxabs(_finite_maxabs(raw, info, checkpoint))
                    summary.seconds["amax"] += time.perf_counter() - started
                    bar.advance()
                    started = time.perf_counter()
    return {member: searches[i].scale() for member, i in plan.group_of.items()}


def _finite_maxabs(raw, info, checkpoint: Checkpoint) -> float:
    value = weight_maxabs(raw, info)
    if not math.isfinite(value):
        raise ModelError(
            f"{checkpoint.path / checkpoint.shard_of[info.name]}: tensor '{info.name}' holds inf/NaN "
            f"(max |x| = {value})",
            fix="fix or re-download that checkpoint; no FP8 scale covers it.",
        )
    return value


# ---- writing ---------------------------------------------------------------------------------------------


def _write_shard(
    checkpoint: Checkpoint,
    shard: str,
    layout: list[PlannedTensor],
    plan: QuantPlan,
    scales: dict[str, float],
    job: QuantizeJob,
    summary: QuantizeSummary,
    scratch: Scratch,
) -> str:
    out_path = job.out / shard
    if shard == KV_SHARD:
        with ShardWriter(out_path, layout) as writer:
            for layer, (k, v) in plan.kv_maxabs.items():
                for name, maxabs in zip(names.kv_scale_names(layer), (k, v)):
                    writer.write_raw(name, _f32(_kv_scale(maxabs, job)))
            return writer.close()
    infos = checkpoint.tensors_in(shard)
    waited = scratch.write_wait
    with (
        ShardReader(checkpoint.path / shard) as reader,
        ShardWriter(out_path, layout, write_behind=True) as writer,
        closing(stream(reader, [i.name for i in infos], scratch)) as tensors,
        progress(f"write {shard}", len(infos), unit="tensors", transient=True) as bar,
    ):
        started = time.perf_counter()
        for name, raw in tensors:
            summary.seconds["read"] += time.perf_counter() - started
            started = time.perf_counter()
            if raw is None:  # larger than the buffers (--low-cpu-mem): copied block by block
                writer.write_chunks(name, chunks(reader, name))
            else:
                _write_tensor(writer, checkpoint.tensors[name], raw, plan, scales, job, summary, scratch)
            summary.seconds["write"] += time.perf_counter() - started
            bar.advance()
            started = time.perf_counter()
        started = time.perf_counter()
        digest = writer.close()
        summary.seconds["write"] += time.perf_counter() - started + scratch.write_wait - waited
        summary.seconds["cast"] -= scratch.write_wait - waited
        return digest


def _write_tensor(
    writer: ShardWriter,
    info,
    raw,
    plan: QuantPlan,
    scales: dict[str, float],
    job: QuantizeJob,
    summary: QuantizeSummary,
    scratch: Scratch,
) -> None:
    """Hand one tensor's outputs to the writer thread; `summary.seconds["cast"]` is moved out of "write"."""
    if not plan.is_quantized(info.name):
        written = writer.write_raw(info.name, raw)
        if written is not None:
            written.result()  # a read buffer may be refilled next; a mapping should not pile up in the queue
        return
    started = time.perf_counter()
    per_channel = job.method.per_channel_weights
    channel = (lambda weight: channel_scales(weight, job.method, job.device)) if per_channel else None
    group = plan.groups[plan.group_of[info.name]]
    hessian = _hessian(job, group.module, info)
    summary.gptq += hessian is not None
    slot, weight, scale = fp8_weight(raw, info, None if per_channel else scales[info.name], scratch, channel, hessian)
    cast = time.perf_counter() - started
    summary.seconds["cast"] += cast
    summary.seconds["write"] -= cast
    prefix = info.name.removesuffix(".weight")
    scratch.busy_until(slot, writer.write_raw(info.name, weight))
    writer.write_raw(f"{prefix}.weight_scale", scale)
    if not job.method.dynamic_only:
        writer.write_raw(f"{prefix}.input_scale", _f32(activation_scale(group.input_maxabs, job.method, job.device)))


def _hessian(job: QuantizeJob, module: str, info):
    """The H GPTQ rounds `info` with (experts: from their routed tokens); None (round to nearest) without one."""
    hessian = None if job.hessians is None else job.hessians.matrices.get(module)
    if hessian is not None and hessian.shape != (info.shape[-1], info.shape[-1]):
        raise ModelError(
            f"{info.name}: {info.shape[-1]} input columns, but the measured hessian of {module} is {hessian.shape}",
            fix="quantize the model that was measured, or quantize with --no-gptq.",
        )
    return hessian


def set_kv_scales(out: Path, value: float) -> int:
    """Every k/v scale of the checkpoint `quantize` wrote to `out` set to `value` (1.0: what vLLM uses with no
    calibrated scale), its shard rewritten in place and its checksum updated in the manifest so a rerun still
    verifies it (and writes the measured scales again). Returns how many were set; 0 when it carries none."""
    path = out / KV_SHARD
    if not path.exists():
        return 0
    scale_names = list(read_header(path)[0])
    layout = [PlannedTensor(name, "F32", (1,)) for name in scale_names]
    with ShardWriter(path, layout) as writer:
        for name in scale_names:
            writer.write_raw(name, _f32(value))
        digest = writer.close()
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["shards"][KV_SHARD] = digest
    manifest["kv_scale_value"] = value
    atomic.write_json(out / MANIFEST, manifest)
    return len(scale_names)


def _kv_scale(maxabs: float, job: QuantizeJob) -> float:
    if job.kv_rule is None:
        return activation_scale(maxabs, job.method, job.device)
    return scale_from_maxabs(leaf_max(maxabs), job.kv_rule, job.device)


def _f32(value: float):
    import numpy as np

    return np.array([value], dtype=np.float32)


def _finish(checkpoint: Checkpoint, layouts: dict[str, list[PlannedTensor]], job: QuantizeJob, *, fp8_kv: bool) -> None:
    weight_map = {t.name: shard for shard, layout in layouts.items() for t in layout}
    total = sum(t.nbytes for layout in layouts.values() for t in layout)
    copy_side_files(checkpoint.path, job.out)
    config = dict(checkpoint.config)
    config["quantization_config"] = compressed_tensors_config(
        per_channel=job.method.per_channel_weights,
        dynamic_activations=job.method.dynamic_only,
        fp8_kv=fp8_kv,
        fp8_dtype_flavor=GAUDI2_FP8_FLAVOR if job.device.name == "gaudi2" else None,
    )
    config.pop("torch_dtype", None)
    config["dtype"] = "bfloat16"
    atomic.write_json(job.out / "config.json", config)
    write_index(job.out, weight_map, total)
