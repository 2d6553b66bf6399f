"""The device families `infer` serves on, behind one interface: what each makes of a request.

    FP8Checkpoint   CPU / CUDA: vLLM loads the FP8 checkpoint `quantize` wrote (its own quantization config)
    Gaudi           INC quantizes the measured model at load with the run's QUANTIZE config, or vllm-gaudi
                    loads a compressed-tensors checkpoint as it is; bounded context and batch, a start-up
                    wait of its own and a fit check (`infer.gaudi`)

`backend_for(target)` picks one; the stage (`infer.stage`) never branches on the device family itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from ray_calib.cluster import devices
from ray_calib.engine.device import Target, detect_device
from ray_calib.errors import ConfigError
from ray_calib.inc import RunMeta
from ray_calib.infer import gaudi, runner
from ray_calib.infer.request import EvalRequest, InferRequest
from ray_calib.infer.runner import InferConfig
from ray_calib.rundir import RunDir
from ray_calib.runrecord import run_measurements


@dataclass
class Resolved:
    """What a backend made of the request: the engine's config, the Gaudi serve plan, lines for the user."""

    config: InferConfig
    serve_plan: gaudi.GaudiServe | None = None
    notes: list[str] = field(default_factory=list)  # what was done (a QUANT_CONFIG written)
    warnings: list[str] = field(default_factory=list)  # what the user should change


@dataclass
class EvalPlan:
    """The two engines `eval` scores: the BF16 baseline and the FP8 candidate, with what each engine alone gets."""

    baseline: Path
    candidate: Path
    tp_size: int
    device: str
    with_fp8_kv: bool  # also the candidate on an FP8 cache, calibrated and at 1.0 (CPU/CUDA rows)
    candidate_fp8_kv: bool = False  # the candidate's own cache (Gaudi: what its QUANT_CONFIG decides)
    baseline_options: dict = field(default_factory=dict)
    candidate_options: dict = field(default_factory=dict)


class Backend(Protocol):
    def default_model(self, run: RunDir) -> Path:
        """Where the scales in use are described when the user names no --model."""
        ...

    def resolve(self, request: InferRequest, meta: RunMeta | None, extra_env: dict[str, str]) -> Resolved: ...

    def kv_source(self, config: InferConfig) -> str:
        """Where the KV-cache dtype came from, for `infer --dry-run` ("" when it is the checkpoint's)."""
        ...

    def dry_run_facts(self, resolved: Resolved, target: Target, conf: Path | None) -> tuple[list, list[str]]:
        """Facts and warnings this family adds to `infer --dry-run`."""
        ...

    def eval_plan(self, request: EvalRequest, meta: RunMeta | None) -> EvalPlan:
        """What `eval` compares on this family, from the flags and the run."""
        ...


def _baseline(request: EvalRequest, meta: RunMeta | None) -> Path:
    if request.baseline is not None:
        return request.baseline
    if not (meta and meta.model):
        raise ConfigError("no --baseline and no model recorded in the run's meta", fix="pass --baseline.")
    return Path(meta.model)


def devices_conf_quant_config(conf: Path) -> str | None:
    path = devices.load(conf).extras.get("INC_QUANT_CONFIG_FILENAME")  # a "path" key: str when set
    return path if isinstance(path, str) else None


class FP8Checkpoint:
    """CPU / CUDA: the checkpoint carries its scales; the TP is the run's target when it fits."""

    def default_model(self, run: RunDir) -> Path:
        return run.fp8

    def resolve(self, request: InferRequest, meta: RunMeta | None, extra_env: dict[str, str]) -> Resolved:
        warnings = []
        if request.conf and devices_conf_quant_config(request.conf):
            warnings.append(
                f"{request.conf}: INC_QUANT_CONFIG_FILENAME applies to Gaudi only; {request.target.device_type} "
                "serves the FP8 checkpoint and ignores it (remove it there, or pass --device gaudi2/gaudi3)"
            )
        model = request.model or request.run.fp8
        runner.check_model_dir(model)
        unified_tp = meta.tp_size if meta and meta.tp_size and meta.unified_from else None
        device = request.target.device
        tp_size = runner.choose_tp(
            model,
            request.tp,
            device=device,
            kv_cache_gib=request.kv_cache_gib,
            max_model_len=request.max_model_len,
            preferred=unified_tp,
        )
        config = InferConfig(
            model=model,
            tp_size=tp_size,
            device=device,
            fp8_kv=runner.resolve_fp8_kv(model, request.fp8_kv),
            quant_config=request.quant_config,
            timeout_s=request.timeout_s,
            max_model_len=request.max_model_len,
            kv_cache_gib=request.kv_cache_gib,
            enforce_eager=request.enforce_eager,
            extra_env=extra_env,
            max_num_seqs=request.max_num_seqs,
            startup_timeout_s=request.startup_timeout_s,
        )
        return Resolved(config, warnings=warnings)

    def kv_source(self, config: InferConfig) -> str:
        return ""

    def eval_plan(self, request: EvalRequest, meta: RunMeta | None) -> EvalPlan:
        candidate = request.candidate or request.run.fp8
        baseline = _baseline(request, meta)
        for model in (baseline, candidate):
            runner.check_model_dir(model)
        device = request.target.device if request.target else detect_device()
        kv_gib, context = request.kv_cache_gib, request.max_model_len
        # One engine at a time, so the larger (BF16) baseline decides; the candidate must allow the same TP.
        tp_size = runner.choose_tp(baseline, request.tp, device=device, kv_cache_gib=kv_gib, max_model_len=context)
        runner.choose_tp(candidate, tp_size, device=device, kv_cache_gib=kv_gib, max_model_len=context)
        return EvalPlan(baseline, candidate, tp_size, device, runner.resolve_fp8_kv(candidate, request.with_fp8_kv))

    def dry_run_facts(self, resolved: Resolved, target: Target, conf: Path | None) -> tuple[list, list[str]]:
        return [], []


class Gaudi:
    """Gaudi: the measured model, its TP, the one-node QUANT_CONFIG, KV dtype and EP, a bounded context and
    batch, and a start-up wait of its own. A compressed-tensors checkpoint (`--model <run>/fp8-gaudi2`)
    needs none of INC's: vllm-gaudi loads it as it is."""

    def default_model(self, run: RunDir) -> Path:
        return run_measurements(run) or run.measure

    def eval_plan(self, request: EvalRequest, meta: RunMeta | None) -> EvalPlan:
        """On Gaudi the candidate is the measured model under INC's QUANTIZE (the run's one-node QUANT_CONFIG, as
        `infer` serves it), or a compressed-tensors checkpoint given as --candidate; the baseline runs as it is."""
        run, candidate = request.run, request.candidate
        ct_kv = gaudi.compressed_tensors_fp8_kv(candidate) if candidate is not None else None
        if candidate is not None and ct_kv is not None:
            tp = gaudi.measured_tp(request.tp, meta)
            baseline = _baseline(request, meta)
            return EvalPlan(baseline, candidate, tp, "hpu", False, ct_kv, baseline_options={"bf16": True})
        plan = gaudi.resolve(
            run,
            meta,
            model=candidate,
            tp=request.tp,
            quant_config=request.quant_config,
            fp8_kv=request.with_fp8_kv,
            write=not request.dry_run,
        )
        return EvalPlan(
            request.baseline or plan.model,
            plan.model,
            plan.tp_size,
            "hpu",
            False,
            plan.fp8_kv,
            baseline_options={"bf16": True},
            candidate_options={"quant_config": plan.quant_config, "expert_parallel": plan.expert_parallel},
        )

    def resolve(self, request: InferRequest, meta: RunMeta | None, extra_env: dict[str, str]) -> Resolved:
        model, write = request.model, not request.dry_run
        ct_kv = gaudi.compressed_tensors_fp8_kv(model) if model is not None else None
        notes = []
        if model is not None and ct_kv is not None:
            plan = gaudi.GaudiServe(
                model=model,
                tp_size=gaudi.measured_tp(request.tp, meta),
                quant_config=None,
                fp8_kv=ct_kv,
                expert_parallel=bool(meta and meta.ep_size and meta.ep_size > 1),
                measurements=request.run.measure,
                generated=False,
                config={},
            )
        else:
            plan = gaudi.resolve(
                request.run,
                meta,
                model=model,
                tp=request.tp,
                quant_config=request.quant_config,
                fp8_kv=request.fp8_kv,
                conf_quant_config=devices_conf_quant_config(request.conf) if request.conf else None,
                write=write,
            )
            if plan.generated and write:
                notes.append(f"wrote {plan.quant_config} (QUANTIZE, measurements in {plan.measurements})")
        config, plan = self._limits(request, plan, meta, extra_env)
        return Resolved(config, plan, notes)

    def _limits(self, request: InferRequest, plan: gaudi.GaudiServe, meta: RunMeta | None, extra_env: dict):
        """The InferConfig of a Gaudi plan with its bounded context and batch, start-up wait and fit check."""
        config = InferConfig(
            model=plan.model,
            tp_size=plan.tp_size,
            device="hpu",
            fp8_kv=plan.fp8_kv,
            quant_config=plan.quant_config,
            timeout_s=request.timeout_s,
            extra_env=extra_env,
            expert_parallel=plan.expert_parallel,
            skip_warmup=request.skip_warmup,
            enforce_eager=request.enforce_eager,
        )
        context, seqs, context_why = gaudi.serve_limits(
            plan.model, meta, max_model_len=request.max_model_len, max_num_seqs=request.max_num_seqs
        )
        config = replace(config, max_model_len=context, max_num_seqs=seqs)
        wait, wait_why = gaudi.startup_timeout(config, request.startup_timeout_s)
        config = replace(config, startup_timeout_s=wait)
        plan = replace(plan, limits=(f"{context} ({context_why}); max_num_seqs {seqs}", f"{wait} s ({wait_why})"))
        if not request.dry_run:  # a dry run shows the fit instead of refusing
            gaudi.check_serve_fit(config, target_bytes=request.target.memory_bytes)
        return config, plan

    def kv_source(self, config: InferConfig) -> str:
        return (
            " (from the QUANT_CONFIG's blocklist)"
            if config.quant_config
            else " (from the checkpoint's kv_cache_scheme)"
        )

    def dry_run_facts(self, resolved: Resolved, target: Target, conf: Path | None) -> tuple[list, list[str]]:
        config, plan = resolved.config, resolved.serve_plan
        facts = []
        if plan is not None and plan.limits:
            facts += [("context", plan.limits[0]), ("start-up wait", plan.limits[1])]
        _, fit = gaudi.serve_fit(config, target.memory_bytes)
        facts.append(("memory", "\n".join(fit.lines())))
        warnings = [f"does not fit: {problem}" for problem in fit.problems()]
        if conf:
            warnings.append(
                f"the QUANT_CONFIG and the measurements it names must be at the same paths on every node "
                f"(ranks on other nodes read {config.quant_config})"
            )
        return facts, warnings


def backend_for(target: Target) -> Backend:
    return Gaudi() if target.is_gaudi else FP8Checkpoint()
