"""`ray-calib quantize` end to end: resolve paths from the run directory, pick the device's path.

Gaudi has two formats. `inc` (the default): INC quantizes at load, so write the QUANT_CONFIG for
`vllm serve --quantization inc` pointing at the measurements; weights stay BF16. `compressed-tensors`:
an FP8 checkpoint for vllm-gaudi's compressed-tensors loader, in Gaudi's range with INC's scale
method (`<run-dir>/fp8-gaudi2`), plus, with `also_cuda`, the CPU/CUDA checkpoint (`<run-dir>/fp8`).
Everything else: write the CPU/CUDA FP8 checkpoint (`convert.quantize`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ray_calib.convert.plan import load_measurement
from ray_calib.convert.quantize import QuantizeJob, QuantizeSummary, quantize_checkpoint
from ray_calib.convert.scale_choice import default_choice
from ray_calib.errors import ConfigError, MeasurementError
from ray_calib.inc.devices import default_method, get_device
from ray_calib.inc.meta import read_meta
from ray_calib.inc.methods import check_method_for_device, get_method, inc_scale_method
from ray_calib.inc.quant_config import build_config, config_name, is_moe, stale_scale_files, write_configs
from ray_calib.inc.target import IncTarget, parse_version
from ray_calib.measurements.hessians import load_model_hessians
from ray_calib.model.checkpoint import FreeSpace, free_bytes
from ray_calib.model.config import is_mla, model_config
from ray_calib.rundir import RunDir
from ray_calib.runrecord import (
    RunFactError,
    RunRecord,
    config_digest,
    decide,
    read_record,
    record_facts,
    run_measurements,
)


@dataclass
class QuantizeRequest:
    run: RunDir
    model: Path | None = None
    measurements: Path | None = None
    out: Path | None = None
    scale_method: str | None = None
    device: str | None = None
    fp8_kv: bool | None = None  # None: the run's record, else the measurements' meta
    override_run: bool = False  # flags that contradict run.json are accepted and recorded
    low_cpu_mem: bool = False
    force: bool = False
    clean_stale_scales: bool = False
    input_backoff: float | None = None
    weight_backoff: float | None = None
    inc_version: str | None = None  # Gaudi: the INC that reads the QUANT_CONFIG (default: the newest)
    weight_strategy: str | None = None  # tensor | channel: CPU/CUDA default scales only
    gptq: bool | None = None  # None: GPTQ rounding when the measurements hold hessians (CPU/CUDA)
    format: str | None = None  # inc | compressed-tensors (None: inc on Gaudi, compressed-tensors elsewhere)
    also_cuda: bool = False  # Gaudi compressed-tensors: also write the CPU/CUDA checkpoint to <run-dir>/fp8
    free_space: FreeSpace = free_bytes


@dataclass
class QuantizeResult:
    device: str
    method: str
    model: Path
    measurements: Path
    summary: QuantizeSummary | None = None  # FP8 checkpoint path
    inc_config: Path | None = None  # Gaudi path
    cuda_summary: QuantizeSummary | None = None  # the CPU/CUDA checkpoint written beside a Gaudi one
    stale: list[Path] = field(default_factory=list)
    cleaned: bool = False
    fp8_kv: bool = False


def quantize_run(request: QuantizeRequest) -> QuantizeResult:
    measurements = request.measurements or _run_measurements(request.run)
    stale = stale_scale_files(measurements)
    if stale and request.clean_stale_scales:
        for path in stale:
            path.unlink()
    measurement, meta = load_measurement(measurements)
    record = _run_record(request.run, Path(measurements), meta)
    model = request.model or (Path(meta.model) if meta and meta.model else None)
    if model is None:
        raise MeasurementError(
            measurements, "has no ray_calib_meta.json naming the model", fix="pass --model BF16_DIR."
        )
    _check_same_model(record, Path(model))
    kv = decide(
        record,
        "fp8_kv",
        request.fp8_kv,
        flag="--fp8-kv" if request.fp8_kv else "--no-fp8-kv",
        stage="quantize",
        override=request.override_run,
    )
    fp8_kv = bool(kv.value if kv.value is not None else (meta and meta.fp8_kv))
    given = request.device.lower() if request.device else None
    dev = decide(
        record, "device_type", given, flag=f"--device {given}", stage="quantize", override=request.override_run
    )
    device = dev.value or (meta.device_type if meta else None)
    if device is None:  # plain INC output may come from Gaudi, where quantize writes a QUANT_CONFIG instead
        raise ConfigError(
            f"{measurements}: no ray_calib_meta.json says which device measured this",
            fix="pass --device gaudi2|gaudi3|cuda|cpu.",
        )
    device = device.lower()
    fmt = _format(request, device)
    if request.fp8_kv and meta is not None and meta.fp8_kv is False:
        raise ConfigError(
            f"--fp8-kv: {measurements} recorded no K/V ranges (measured without --fp8-kv)",
            fix="measure with --fp8-kv, or quantize without --fp8-kv.",
        )
    kv_rule = None
    if request.scale_method is None and not device.startswith("gaudi"):
        choice = default_choice(
            input_backoff=request.input_backoff,
            weight_backoff=request.weight_backoff,
            weight_strategy=request.weight_strategy,
        )
        method, kv_rule = choice.method, choice.kv_rule()
    else:
        if request.weight_strategy is not None:
            raise ConfigError(
                f"--weight-strategy {request.weight_strategy} applies to ray-calib's CPU/CUDA scales "
                f"only, not to {'Gaudi' if device.startswith('gaudi') else '--scale-method'}",
                fix="drop --weight-strategy (INC scale methods fix the weight granularity: "
                "the *_weights_pcs_* methods are per channel).",
            )
        method = get_method(
            request.scale_method or default_method(device),
            input_backoff=request.input_backoff,
            weight_backoff=request.weight_backoff,
        )
    check_method_for_device(method, get_device(device))
    result = QuantizeResult(
        device=device,
        method=method.name,
        model=Path(model),
        measurements=Path(measurements),
        stale=stale,
        cleaned=bool(stale and request.clean_stale_scales),
        fp8_kv=fp8_kv,
    )
    overrides = [d.override for d in (kv, dev) if d.override]
    facts = {"fp8_kv": fp8_kv, "scale_method": method.name, "quantized": str(Path(measurements))}
    hessians = _hessians(request, Path(measurements), device)
    if fmt == "inc":
        result.inc_config = _write_inc_config(
            request, measurements, method.name, model, measurement.name.prefix, fp8_kv
        )
        if record is not None:
            record_facts(record, "quantize", {**facts, "format": "inc-quant-config"}, overrides)
        return result

    job = QuantizeJob(
        model=Path(model),
        measurement=measurement,
        out=request.out or (request.run.fp8_for(device) if device.startswith("gaudi") else request.run.fp8),
        method=method,
        device=get_device(device),
        fp8_kv=fp8_kv,
        kv_rule=kv_rule,
        hessians=hessians,
        low_cpu_mem=request.low_cpu_mem,
        force=request.force,
        free_space=request.free_space,
    )
    result.summary = quantize_checkpoint(job)
    if record is not None:
        record_facts(
            record, "quantize", {**facts, "format": "compressed-tensors", "checkpoint": str(job.out)}, overrides
        )
    if request.also_cuda:
        choice = default_choice()
        cuda = replace(
            job,
            out=request.run.fp8,
            method=choice.method,
            kv_rule=choice.kv_rule(),
            device=get_device("cuda"),
            hessians=_hessians(request, Path(measurements), "cuda"),
        )
        result.cuda_summary = quantize_checkpoint(cuda)
    return result


FORMATS = ("inc", "compressed-tensors")


def _format(request: QuantizeRequest, device: str) -> str:
    """inc (Gaudi's QUANT_CONFIG) or compressed-tensors (an FP8 checkpoint); refuses the mixes that cannot work."""
    gaudi = device.startswith("gaudi")
    fmt = request.format or ("inc" if gaudi else "compressed-tensors")
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: unknown", fix=f"use one of {', '.join(FORMATS)}.")
    if fmt == "inc" and not gaudi:
        raise ConfigError(
            f"--format inc: INC's QUANT_CONFIG route is for Gaudi, not {device}",
            fix="drop --format (CPU/CUDA get a compressed-tensors checkpoint) or pass --device gaudi2|gaudi3.",
        )
    if request.also_cuda and not (gaudi and fmt == "compressed-tensors"):
        raise ConfigError(
            "--also-cuda writes the CPU/CUDA checkpoint beside a Gaudi compressed-tensors one",
            fix="add --device gaudi2|gaudi3 --format compressed-tensors, or drop --also-cuda.",
        )
    if fmt == "inc" and request.low_cpu_mem:
        raise ConfigError(
            "--low-cpu-mem bounds the memory of writing an FP8 checkpoint; on Gaudi with --format inc nothing "
            "is written (INC quantizes the BF16 weights while vLLM loads them, and vllm-gaudi has no such switch)",
            fix="drop --low-cpu-mem, or write the checkpoint with --format compressed-tensors.",
        )
    return fmt


def _run_record(run: RunDir, measurements: Path, meta) -> RunRecord | None:
    """The run's record when these measurements are the run's; measurements of another run are refused."""
    record = read_record(run.root)
    if record is None:
        return None
    own = measurements.absolute().is_relative_to(run.root)
    run_id = meta.run_id if meta else None
    if run_id is not None and run_id != record.run_id:
        raise RunFactError(
            f"{measurements}: measurements of run {run_id}, but {record.path} is run {record.run_id}",
            fix="pass the --run-dir those measurements belong to, or measure again in this run",
        )
    return record if own or run_id is not None else None


def _check_same_model(record: RunRecord | None, model: Path) -> None:
    """--model must be the measured model: its config.json is compared with the recorded one's digest."""
    recorded = record.value("config_sha256") if record else None
    if recorded is None or not (model / "config.json").is_file() or config_digest(model) == recorded:
        return
    raise RunFactError(
        f"--model {model}: its config.json differs from the measured model's ({record.value('model') if record else ''}"
        f", sha256 recorded in {record.path if record else 'run.json'})",
        fix="pass the model that was measured, or measure this one in a new run (--run-dir NEW_DIR)",
    )


def _hessians(request: QuantizeRequest, measurements: Path, device: str):
    """The hessians GPTQ rounds with: the measurement's, unless --no-gptq or Gaudi (INC rounds to nearest)."""
    if request.gptq is False:
        return None
    if device.startswith("gaudi"):
        if request.gptq:
            raise ConfigError(
                "--gptq: on Gaudi INC quantizes the BF16 weights at load, rounding to nearest",
                fix="drop --gptq.",
            )
        return None
    found = load_model_hessians(measurements)
    if found is None and request.gptq:
        raise ConfigError(
            f"--gptq: {measurements} holds no hessians",
            fix="measure with `ray-calib measure --hessians` (and unify again), or drop --gptq.",
        )
    return found


# what a unified directory copies from the measurement it came from: any difference means it is older
_SOURCE_FIELDS = ("model", "dataset_hash", "num_samples", "num_tokens", "chunks_done", "chunks_total", "observer")


def _run_measurements(run: RunDir) -> Path:
    """The run's unified directory (`runrecord.run_measurements`), else measure/; it must come from measure/.

    After a re-measure without a re-unify the unified directory still holds the old ranges: refused.
    """
    unified = run_measurements(run)
    if unified is None:
        return run.measure
    source, derived = read_meta(run.measure), read_meta(unified)
    if source is None or derived is None:
        return unified
    changed = [
        f"{k}: {getattr(derived, k)!r} vs {getattr(source, k)!r}"
        for k in _SOURCE_FIELDS
        if getattr(derived, k) != getattr(source, k)
    ]
    if changed:
        raise ConfigError(
            f"{unified} was unified from another measurement than {run.measure} ({', '.join(changed[:3])})",
            fix=f"re-run `ray-calib unify --run-dir {run.root} --to-tp {derived.tp_size} --force`, "
            f"or pass --measurements {run.measure}.",
        )
    return unified


def _backoff_config(request: QuantizeRequest, method: str) -> dict:
    """Backoff overrides as the target INC reads them: scale_params up to 3.4, a dict-form scale_method after."""
    target = IncTarget(parse_version(request.inc_version)) if request.inc_version else IncTarget()
    if target.reads_scale_params:
        return {
            "scale_params": {
                k: v
                for k, v in (("input_backoff", request.input_backoff), ("weight_backoff", request.weight_backoff))
                if v
            }
        }
    custom = get_method(method, input_backoff=request.input_backoff, weight_backoff=request.weight_backoff)
    return {"scale_method": inc_scale_method(custom)}


def _write_inc_config(
    request: QuantizeRequest, measurements: Path, method: str, model: str | Path, prefix: str, fp8_kv: bool
) -> Path:
    """Gaudi: INC computes scales from the measurements when vLLM loads the BF16 model."""
    if request.out and any(Path(request.out).glob("*.safetensors")):
        raise ConfigError(
            f"{request.out}: on Gaudi quantize writes a QUANT_CONFIG, not weights",
            fix="drop --out (configs go to <run-dir>/configs) or pass a directory for the config.",
        )
    one_node = Path(measurements).resolve() != request.run.measure.resolve()
    config = build_config(
        measure=False,
        fp8_kv=fp8_kv,
        one_node=one_node,
        scale_method=method,
        dump_stats_path=str(Path(measurements).absolute() / prefix),
        moe=is_moe(model_config(model), str(model)),
        mla=is_mla(model_config(model)),
    )
    if request.input_backoff or request.weight_backoff:
        config.update(_backoff_config(request, method))
    out = Path(request.out) if request.out else request.run.configs
    name = config_name(measure=False, fp8_kv=fp8_kv, one_node=one_node)
    return write_configs(out, {name: config})[0]
