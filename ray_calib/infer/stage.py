"""The `infer` and `eval` stages as a library: a typed request in, a plan or a result out.

    plan(InferRequest)       every fact the engine will run with, through the device family's backend
                             (`infer.backends`): model, TP, KV-cache dtype, QUANT_CONFIG, limits
    dry_run(plan, ...)       what `infer --dry-run` prints, per node
    run(plan, prompts, ...)  offline generation (or side by side with a BF16 baseline), the scale audit,
                             completions saved in the run directory
    eval_plan(EvalRequest)   the baseline and candidate engines of the device family (Gaudi: the measured
                             model under INC's QUANTIZE); eval_engines shows them (`eval --dry-run`)
    evaluate(EvalRequest)    BF16 against FP8 on held-out text, the verdict `push` checks, eval.json

`cli/infer.py` parses the options into these requests and prints what comes back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_calib import atomic
from ray_calib.cluster import connect, devices
from ray_calib.engine.device import GiB, detect_target
from ray_calib.engine.launch import engine_settings
from ray_calib.engine.plan import EnginePlan, local_node, nodes_from_conf
from ray_calib.errors import EngineError
from ray_calib.inc import RunMeta, read_meta
from ray_calib.inc.quant_config import read_config
from ray_calib.infer import fidelity, runner
from ray_calib.infer.backends import Backend, EvalPlan, Resolved, backend_for
from ray_calib.infer.compare import side_by_side
from ray_calib.infer.request import EvalRequest, InferRequest
from ray_calib.rundir import RunDir
from ray_calib.runrecord import checkpoint_digest, read_record, record_facts, run_measurements


@dataclass
class InferPlan:
    request: InferRequest
    backend: Backend
    resolved: Resolved

    @property
    def config(self) -> runner.InferConfig:
        return self.resolved.config


def run_meta(run: RunDir, model: Path) -> tuple[RunMeta | None, Path]:
    """The sidecar that describes the scales in use: next to the checkpoint, else the run's measurements."""
    for directory in (model, run_measurements(run), run.measure):
        if directory is not None and (meta := read_meta(directory)) is not None:
            return meta, directory
    return None, model


def plan(request: InferRequest) -> InferPlan:
    """Resolve the request into the engine's settings (a dry run joins no cluster and writes nothing)."""
    run, target, backend = request.run, request.target, backend_for(request.target)
    meta, meta_dir = run_meta(run, request.model or backend.default_model(run))
    runner.check_device_type(meta, target.device_type, allow_mismatch=request.allow_device_mismatch, where=meta_dir)
    extra_env = {}
    if request.conf:  # a dry run shows the address without joining
        extra_env["RAY_ADDRESS"] = devices.load(request.conf).address if request.dry_run else connect(request.conf)
    return InferPlan(request, backend, backend.resolve(request, meta, extra_env))


def dry_run(infer_plan: InferPlan, *, serve: bool, host: str, port: int) -> EnginePlan:
    """What `infer` would start, per node (the ranks run on this node unless --conf)."""
    request, config, gaudi_plan = infer_plan.request, infer_plan.config, infer_plan.resolved.serve_plan
    target, conf = request.target, request.conf
    engine = runner.engine_config(config)
    memory = f", {target.memory_bytes / GiB:.0f} GiB per device" if target.memory_bytes else ""
    facts: list[tuple[str, str]] = [
        ("model", str(config.model)),
        ("device", f"{target.device_type} [{target.device}]{memory} ({target.source})"),
        ("parallel", f"TP {config.tp_size}{', expert parallel' if config.expert_parallel else ''}"),
        ("KV cache", engine.kv_cache_dtype + infer_plan.backend.kv_source(config)),
    ]
    more, warnings = infer_plan.backend.dry_run_facts(infer_plan.resolved, target, conf)
    quant = gaudi_plan.config if gaudi_plan else (read_config(config.quant_config) if config.quant_config else None)
    quant = quant or None  # a compressed-tensors checkpoint on Gaudi has none
    note = None
    if gaudi_plan is not None:
        written = "would be written by the run" if gaudi_plan.generated else "as it is"
        note = f"{written}; measurements {gaudi_plan.measurements}"
    nodes = nodes_from_conf(devices.load(conf), config.tp_size) if conf else local_node(config.tp_size)
    return EnginePlan(
        warnings=warnings,
        title="ray-calib infer --dry-run: nothing is started, no device is opened",
        facts=facts + more,
        engine=engine,
        quant_config=quant,
        quant_config_path=str(config.quant_config) if quant else None,
        nodes=nodes,
        serve_args=runner.serve_command(config, host=host, port=port) if serve else None,
        quant_config_note=note,
    )


@dataclass
class InferResult:
    completions: list[Any]  # runner.Completion, or compare.SideBySide rows with a baseline
    audit: dict[str, Any] | None  # ScaleAudit.to_json(); None: nothing to audit
    saved: Path


def run(infer_plan: InferPlan, prompts: list[str], *, max_new_tokens: int, baseline: Path | None) -> InferResult:
    """Generate (beside the BF16 baseline when given), audit the engine's scales, save the completions."""
    config, root = infer_plan.config, infer_plan.request.run.root
    if baseline is not None:
        runner.check_model_dir(baseline)
        rows, found = side_by_side(config, baseline, prompts, max_new_tokens=max_new_tokens)
    else:
        rows, audit = runner.generate_audited(config, prompts, max_new_tokens=max_new_tokens)
        found = audit.to_json() if audit else None
    saved = atomic.write_json(root / "infer" / "completions.json", [row.__dict__ for row in rows])
    return InferResult(rows, found, saved)


@dataclass
class EvalResult:
    report: fidelity.FidelityReport
    verdict: dict[str, Any]
    saved: Path

    def check(self, min_agreement: float | None) -> None:
        """Fail when top-1 agreement is below the threshold the user asked for."""
        worst = self.report.worst_agreement()
        if min_agreement is not None and worst < min_agreement:
            raise EngineError(
                f"top-1 agreement {worst:.3f} is below --min-agreement {min_agreement}",
                fix="inspect the ranges (`ray-calib report`), try another --scale-method, or measure more samples.",
            )


def eval_plan(request: EvalRequest) -> EvalPlan:
    """The baseline and candidate engines of this device family (`infer.backends`)."""
    target = request.target or detect_target()
    backend = backend_for(target)
    meta, _ = run_meta(request.run, request.candidate or backend.default_model(request.run))
    return backend.eval_plan(request, meta)


def eval_engines(request: EvalRequest, plan: EvalPlan) -> dict[str, Any]:
    """`eval --dry-run`: the engine settings and environment each scored model would get."""
    engines = {}
    for name, model, fp8_kv, options in (
        ("baseline", plan.baseline, False, plan.baseline_options),
        ("candidate", plan.candidate, plan.candidate_fp8_kv, plan.candidate_options),
    ):
        config = runner.InferConfig(
            model=model,
            tp_size=plan.tp_size,
            device=plan.device,
            fp8_kv=fp8_kv,
            max_model_len=request.max_model_len,
            kv_cache_gib=request.kv_cache_gib,
            enforce_eager=request.enforce_eager,
            **options,
        )
        engine = runner.engine_config(config)
        env = {k: v for k, v in engine.extra_env.items() if k in ("QUANT_CONFIG", "PT_HPU_WEIGHT_SHARING")}
        engines[name] = {"model": str(model), **engine_settings(engine), "quantization": engine.quantization, **env}
    return engines


def evaluate(request: EvalRequest) -> EvalResult:
    """Score BF16 and FP8 on the same windows, write eval.json with the verdict `push` checks."""
    plan = eval_plan(request)
    report = fidelity.evaluate(
        plan.baseline,
        plan.candidate,
        request.texts,
        tp_size=plan.tp_size,
        device=plan.device,
        with_fp8_kv=plan.with_fp8_kv,
        max_model_len=request.max_model_len,
        engine_options={"kv_cache_gib": request.kv_cache_gib, "enforce_eager": request.enforce_eager},
        baseline_options=plan.baseline_options,
        candidate_options=plan.candidate_options,
        candidate_fp8_kv=plan.candidate_fp8_kv,
    )
    dropped = sum(len(audit["dropped"]) for audit in report.scale_audit.values())
    candidate = plan.candidate
    verdict = _verdict(candidate, report.worst_agreement(), request.min_agreement, dropped, request.allow_scale_loss)
    run = request.run
    saved = fidelity.write_report(report, request.out or run.eval_json, verdict)
    if (record := read_record(run.root)) is not None and request.out is None:
        record_facts(record, "eval", {"eval": verdict})
    return EvalResult(report, verdict, saved)


def _verdict(candidate: Path, worst: float, min_agreement: float | None, dropped: int, allow_loss: bool) -> dict:
    """What `push` checks before publishing: this checkpoint (by digest) met a threshold with its scales in use."""
    return {
        "candidate": str(candidate.absolute()),
        "candidate_digest": checkpoint_digest(candidate),
        "min_agreement": min_agreement,
        "worst_agreement": worst,
        "dropped_scales": dropped,
        "allow_scale_loss": allow_loss,
        "passed": min_agreement is not None and worst >= min_agreement and (dropped == 0 or allow_loss),
    }
