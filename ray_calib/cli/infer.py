"""`ray-calib infer` and `ray-calib eval`: thin commands over `infer.runner` and `infer.fidelity`."""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path

import click

from ray_calib import atomic, ui
from ray_calib.cli import options
from ray_calib.cli.engine_options import enforce_eager_option, kv_cache_gib_option, max_model_len_option
from ray_calib.cli.options import run_dir_option
from ray_calib.cluster import connect, devices
from ray_calib.data.texts import default_heldout
from ray_calib.engine.device import GiB, detect_device, detect_target
from ray_calib.engine.plan import EnginePlan, local_node, nodes_from_conf
from ray_calib.errors import EngineError
from ray_calib.inc import read_meta
from ray_calib.inc.quant_config import read_config
from ray_calib.infer import fidelity, gaudi, runner
from ray_calib.infer.audit import ScaleAudit, check
from ray_calib.infer.compare import format_side_by_side, side_by_side
from ray_calib.infer.runner import check_model_dir
from ray_calib.rundir import RunDir
from ray_calib.runrecord import checkpoint_digest, read_record, record_facts, run_measurements

_dir = click.Path(file_okay=False, path_type=Path)
_file = click.Path(dir_okay=False, path_type=Path)
allow_scale_loss_option = click.option(
    "--allow-scale-loss",
    is_flag=True,
    help="Go on when the engine does not use a scale the FP8 checkpoint carries (the audit names it).",
)


def _run_meta(run: RunDir, model: Path):
    """The sidecar that describes the scales in use: next to the checkpoint, else the run's measurements."""
    for directory in (model, run_measurements(run), run.measure):
        if directory is not None and (meta := read_meta(directory)) is not None:
            return meta, directory
    return None, model


@options.command()
@click.option("--one-node", is_flag=True, hidden=True, help="Deprecated: this node alone is the default.")
@options.conf_option("Spread the ranks over the cluster `up` started from this devices.conf [default: this node].")
@click.option("--model", type=_dir, help="Model directory [default: <run-dir>/fp8; on Gaudi the measured model].")
@options.tp_option(
    help="Tensor-parallel size [default: the run's target TP (run.json) when it fits, else the "
    "smallest the model allows that fits in memory]."
)
@click.option("--prompts", type=_file, help="One prompt per line (or JSONL with 'prompt').")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option(
    "--fp8-kv/--no-fp8-kv",
    default=None,
    help="FP8 KV cache [default: when the checkpoint carries k/v scales; on Gaudi as measured]; --fp8-kv on "
    "a checkpoint without them is refused (vLLM would use scale 1.0).",
)
@click.option("--baseline", type=_dir, help="Also run this BF16 model and print both answers side by side.")
@click.option("--serve", is_flag=True, help="Start an OpenAI-compatible server (vllm serve) instead.")
@click.option("--detach", is_flag=True, help="With --serve: return once healthy, leaving the server running.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option(
    "--quant-config",
    type=_file,
    help="Gaudi: the QUANTIZE QUANT_CONFIG INC applies at load [default: "
    "devices.conf INC_QUANT_CONFIG_FILENAME, else the run's one-node config for this TP, written if absent].",
)
@options.engine_timeout_option(
    "Seconds for vLLM to start and for one step (VLLM_ENGINE_READY_TIMEOUT_S, "
    "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS and their older names)."
)
@click.option(
    "--startup-timeout",
    type=click.IntRange(min=1),
    help="Seconds `--serve` waits for the server to answer /health [default: --timeout; on Gaudi derived from "
    "the checkpoint size, the host read speed and the warm-up].",
)
@click.option(
    "--max-num-seqs",
    type=click.IntRange(min=1),
    help="Sequences served at once [default: vLLM's; on Gaudi 64, as the upstream DeepSeek-R1 quickstart].",
)
@click.option("--skip-warmup", is_flag=True, help="Gaudi: VLLM_SKIP_WARMUP (faster start, graphs built on first use).")
@click.option("--allow-device-mismatch", is_flag=True, help="Use scales measured on another device type.")
@allow_scale_loss_option
@options.device_option(
    runtime=True,
    help="Target device [env RAY_CALIB_DEVICE]; gaudi2/gaudi3 are taken as given (for --dry-run anywhere).",
)
@click.option("--dry-run", is_flag=True, help="Print the engine arguments, env and QUANT_CONFIG; start nothing.")
@max_model_len_option
@kv_cache_gib_option
@enforce_eager_option
@run_dir_option
def infer(
    one_node: bool,
    conf: Path | None,
    model: Path | None,
    tp_size: int | None,
    prompts: Path | None,
    max_new_tokens: int,
    fp8_kv: bool | None,
    baseline: Path | None,
    serve: bool,
    detach: bool,
    host: str,
    port: int,
    quant_config: Path | None,
    timeout_s: int,
    startup_timeout: int | None,
    max_num_seqs: int | None,
    skip_warmup: bool,
    allow_device_mismatch: bool,
    allow_scale_loss: bool,
    device: str,
    dry_run: bool,
    max_model_len: int | None,
    kv_cache_gib: float,
    enforce_eager: bool,
    run_dir: str | None,
) -> None:
    """Run the quantized model with vLLM: offline generation, or `--serve` an OpenAI API.

    \b
    Examples:
      ray-calib infer --prompts prompts.txt
      ray-calib infer --serve --port 8000
    """
    if one_node:
        options.deprecated("--one-node", "nothing (one node is the default; --conf spreads over a cluster)")
    if one_node and conf:
        raise click.UsageError("--one-node and --conf exclude each other.")
    tp = tp_size
    run = RunDir.resolve(run_dir)
    target = detect_target(device)
    device = target.device
    meta, meta_dir = _run_meta(run, model or ((run_measurements(run) or run.measure) if target.is_gaudi else run.fp8))
    runner.check_device_type(meta, target.device_type, allow_mismatch=allow_device_mismatch, where=meta_dir)
    extra_env = {}
    if conf and not dry_run:
        extra_env["RAY_ADDRESS"] = connect(conf)
    elif conf:
        extra_env["RAY_ADDRESS"] = devices.load(conf).address  # shown, not joined
    if target.is_gaudi:
        config, serve_plan = _gaudi_config(
            run,
            meta,
            model,
            tp,
            quant_config,
            fp8_kv,
            conf,
            timeout_s,
            extra_env,
            write=not dry_run,
            card_bytes=target.memory_bytes,
            limits=(max_model_len, max_num_seqs, startup_timeout, skip_warmup, enforce_eager),
        )
    else:
        serve_plan = None
        if conf and devices_conf_quant_config(conf):
            ui.warn(
                f"{conf}: INC_QUANT_CONFIG_FILENAME applies to Gaudi only; {target.device_type} serves the FP8 "
                "checkpoint and ignores it (remove it there, or pass --device gaudi2/gaudi3)"
            )
        model = model or run.fp8
        runner.check_model_dir(model)
        unified_tp = meta.tp_size if meta and meta.tp_size and meta.unified_from else None
        tp_size = runner.choose_tp(
            model, tp, device=device, kv_cache_gib=kv_cache_gib, max_model_len=max_model_len, preferred=unified_tp
        )
        config = runner.InferConfig(
            model=model,
            tp_size=tp_size,
            device=device,
            fp8_kv=runner.resolve_fp8_kv(model, fp8_kv),
            quant_config=quant_config,
            timeout_s=timeout_s,
            max_model_len=max_model_len,
            kv_cache_gib=kv_cache_gib,
            enforce_eager=enforce_eager,
            extra_env=extra_env,
            max_num_seqs=max_num_seqs,
            startup_timeout_s=startup_timeout,
        )
    if dry_run:
        click.echo(_plan(config, target, serve, host, port, conf, serve_plan).render())
        return
    ui.library_logs(run.root, "infer")
    ui.note(
        f"vLLM on {target.device_type}, TP={config.tp_size}, KV cache {runner.engine_config(config).kv_cache_dtype}; "
        f"start-up wait {config.startup_timeout_s or timeout_s} s, step timeout {timeout_s} s"
    )
    if serve:
        _serve(runner, config, host, port, detach, run, allow_scale_loss)
        return
    if baseline is not None:
        _side_by_side(config, baseline, runner.load_prompts(prompts), max_new_tokens, run, allow_scale_loss)
        return
    completions, audit = runner.generate_audited(config, runner.load_prompts(prompts), max_new_tokens=max_new_tokens)
    for completion in completions:
        click.echo(f"> {completion.prompt}\n  {completion.text.strip()!r} ({completion.num_tokens} tokens)")

    out = atomic.write_json(
        run.root / "infer" / "completions.json", [completion.__dict__ for completion in completions]
    )
    click.echo(f"completions saved to {out}")
    _report_audit(_json(audit), allow_scale_loss)


def _report_audit(found: dict | None, allow_scale_loss: bool) -> None:
    """The engine's scale audit on stdout; a dropped scale fails the command unless --allow-scale-loss."""
    if found is None:
        return
    result = ScaleAudit.from_json(found)
    click.echo(result.summary())
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    for line in result.dropped[1:] if not allow_scale_loss else result.dropped:
        ui.warn(line)
    check(result, allow_scale_loss=allow_scale_loss)


def _side_by_side(
    config, baseline: Path, prompts: list[str], max_new_tokens: int, run: RunDir, allow_scale_loss: bool
) -> None:
    check_model_dir(baseline)
    rows, audit = side_by_side(config, baseline, prompts, max_new_tokens=max_new_tokens)
    click.echo(format_side_by_side(rows))
    click.echo(f"{sum(r.same for r in rows)} of {len(rows)} answers identical")
    out = atomic.write_json(run.root / "infer" / "completions.json", [row.__dict__ for row in rows])
    click.echo(f"completions saved to {out}")
    _report_audit(audit, allow_scale_loss)


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


def devices_conf_quant_config(conf: Path) -> str | None:
    path = devices.load(conf).extras.get("INC_QUANT_CONFIG_FILENAME")  # a "path" key: str when set
    return path if isinstance(path, str) else None


def _gaudi_config(
    run: RunDir,
    meta,
    model,
    tp,
    quant_config,
    fp8_kv,
    conf,
    timeout_s: int,
    extra_env: dict,
    *,
    write: bool,
    card_bytes: int | None,
    limits: tuple[int | None, int | None, int | None, bool, bool],
):
    """Gaudi defaults from the run: the measured model, its TP, the one-node QUANT_CONFIG, KV dtype and EP,
    a bounded context and batch, and a start-up wait of its own. A compressed-tensors checkpoint (`--model
    <run>/fp8-gaudi2`) needs none of INC's: vllm-gaudi loads it as it is."""
    ct_kv = gaudi.compressed_tensors_fp8_kv(model) if model is not None else None
    if ct_kv is not None:
        plan = gaudi.GaudiServe(
            model=model,
            tp_size=tp or (meta.tp_size if meta and meta.tp_size else 8),
            quant_config=None,
            fp8_kv=ct_kv,
            expert_parallel=bool(meta and meta.ep_size and meta.ep_size > 1),
            measurements=run.measure,
            generated=False,
            config={},
        )
        return _gaudi_limits(plan, meta, extra_env, timeout_s, limits, write, card_bytes)
    conf_quant = devices_conf_quant_config(conf) if conf else None
    plan = gaudi.resolve(
        run,
        meta,
        model=model,
        tp=tp,
        quant_config=quant_config,
        fp8_kv=fp8_kv,
        conf_quant_config=conf_quant,
        write=write,
    )
    if plan.generated and write:
        click.echo(f"wrote {plan.quant_config} (QUANTIZE, measurements in {plan.measurements})")
    return _gaudi_limits(plan, meta, extra_env, timeout_s, limits, write, card_bytes)


def _gaudi_limits(plan, meta, extra_env: dict, timeout_s: int, limits, write: bool, card_bytes: int | None):
    """The InferConfig of a Gaudi plan with its bounded context and batch, start-up wait and fit check."""
    max_model_len, max_num_seqs, startup, skip_warmup, enforce_eager = limits
    config = runner.InferConfig(
        model=plan.model,
        tp_size=plan.tp_size,
        device="hpu",
        fp8_kv=plan.fp8_kv,
        quant_config=plan.quant_config,
        timeout_s=timeout_s,
        extra_env=extra_env,
        expert_parallel=plan.expert_parallel,
        skip_warmup=skip_warmup,
        enforce_eager=enforce_eager,
    )
    context, seqs, context_why = gaudi.serve_limits(
        plan.model, meta, max_model_len=max_model_len, max_num_seqs=max_num_seqs
    )
    config = replace(config, max_model_len=context, max_num_seqs=seqs)
    wait, wait_why = gaudi.startup_timeout(config, startup)
    config = replace(config, startup_timeout_s=wait)
    plan = replace(plan, limits=(f"{context} ({context_why}); max_num_seqs {seqs}", f"{wait} s ({wait_why})"))
    if write:  # a dry run shows the fit instead of refusing
        gaudi.check_serve_fit(config, target_bytes=card_bytes)
    return config, plan


def _kv_source(target, config) -> str:
    if not target.is_gaudi:
        return ""
    return " (from the QUANT_CONFIG's blocklist)" if config.quant_config else " (from the checkpoint's kv_cache_scheme)"


def _plan(config, target, serve: bool, host: str, port: int, conf: Path | None, gaudi_plan=None):
    """What `infer` would start, per node (the ranks run on this node unless --conf)."""
    engine = runner.engine_config(config)
    facts = [
        ("model", str(config.model)),
        (
            "device",
            f"{target.device_type} [{target.device}]"
            + (f", {target.memory_bytes / GiB:.0f} GiB per device" if target.memory_bytes else "")
            + f" ({target.source})",
        ),
        ("parallel", f"TP {config.tp_size}{', expert parallel' if config.expert_parallel else ''}"),
        ("KV cache", engine.kv_cache_dtype + _kv_source(target, config)),
    ]
    if gaudi_plan is not None and gaudi_plan.limits:
        facts += [("context", gaudi_plan.limits[0]), ("start-up wait", gaudi_plan.limits[1])]
    quant = gaudi_plan.config if gaudi_plan else (read_config(config.quant_config) if config.quant_config else None)
    quant = quant or None  # a compressed-tensors checkpoint on Gaudi has none
    note = None
    if gaudi_plan is not None:
        note = (
            "would be written by the run" if gaudi_plan.generated else "as it is"
        ) + f"; measurements {gaudi_plan.measurements}"
    nodes = local_node(config.tp_size)
    if conf:
        nodes = nodes_from_conf(devices.load(conf), config.tp_size)
    args = runner.serve_command(config, host=host, port=port) if serve else None
    warnings = []
    if target.is_gaudi:
        _, fit = gaudi.serve_fit(config, target.memory_bytes)
        facts.append(("memory", "\n".join(fit.lines())))
        warnings += [f"does not fit: {problem}" for problem in fit.problems()]
    if conf and target.is_gaudi:
        warnings.append(
            f"the QUANT_CONFIG and the measurements it names must be at the same paths on every node "
            f"(ranks on other nodes read {config.quant_config})"
        )
    return EnginePlan(
        warnings=warnings,
        title="ray-calib infer --dry-run: nothing is started, no device is opened",
        facts=facts,
        engine=engine,
        quant_config=quant,
        quant_config_path=str(config.quant_config) if quant else None,
        nodes=nodes,
        serve_args=args,
        quant_config_note=note,
    )


def _json(audit: ScaleAudit | None) -> dict | None:
    return audit.to_json() if audit else None


def _serve(runner, config, host: str, port: int, detach: bool, run: RunDir, allow_scale_loss: bool) -> None:
    if not detach:
        signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM to us unwinds like Ctrl-C, through the `finally`
    shown = {k: v for k, v in runner.serve_env(config, host).items() if k in _SHOWN_ENV}
    click.echo(
        "serving with: "
        + "".join(f"{key}={value} " for key, value in shown.items())
        + "vllm "
        + " ".join(runner.serve_args(config, host=host, port=port))
    )
    click.echo(f"  ({runner.profile_note(config)})")
    server = runner.serve(config, host=host, port=port, log=run.root / "infer" / "vllm-serve.log")
    stop_server = True
    try:
        reported = runner.served_settings(server)
        if "max_model_len" in reported:
            click.echo(f"  server reports max_model_len {reported['max_model_len']}")
        reply = runner.complete(server, "Hello", timeout_s=config.timeout_s)
        click.echo(
            f"serving {config.model} at {server.url}/v1 (model '{server.model_name}', pid {server.pid}); "
            f"smoke test completion: {reply.strip()!r}; log {server.log}"
        )
        if runner.audits_served(config, host):
            _report_audit(_json(runner.audit_served(server, config)), allow_scale_loss)
        elif config.device != "hpu" and runner.checkpoint_kv_scales(config.model) is not None:
            ui.note(
                f"scale audit skipped: it reads the engine through vLLM's development endpoints, opened on a "
                f"loopback host only (not {host}); `ray-calib infer` or `eval` audits the same checkpoint"
            )
        if detach:
            click.echo(f"stop it with: kill {server.pid}")
            stop_server = False
            return
        while True:
            signal.pause()
    finally:
        if stop_server:
            runner.stop(server.pid)


_SHOWN_ENV = ("VLLM_CPU_OMP_THREADS_BIND", "QUANT_CONFIG", runner.DEV_MODE_ENV)


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def _eval_texts(path: Path | None) -> list[str]:
    """--texts, else the built-in held-out passages (four short prompts would be a few dozen tokens)."""
    if path is not None:
        return runner.load_prompts(path)

    texts, note = default_heldout()
    ui.note(note)
    return texts


@options.command(name="eval")
@click.option("--baseline", type=_dir, help="The BF16 model [default: the model in the run's meta].")
@click.option("--candidate", type=_dir, help="The FP8 model [default: <run-dir>/fp8].")
@click.option(
    "--texts",
    type=_file,
    help="Held-out texts, one per line (or JSONL with 'text') [default: 16 held-out passages of Python's docs].",
)
@options.tp_option(help="Tensor-parallel size [default: the smallest the models allow that fits in memory].")
@click.option(
    "--fp8-kv/--no-fp8-kv",
    "with_fp8_kv",
    default=None,
    help="Also score the candidate with an FP8 KV cache, with its k/v scales and, beside them, with vLLM's "
    "scale 1.0 (the others always run a BF16 one) [default: when the candidate carries k/v scales; --fp8-kv on "
    "one without is refused].",
)
@click.option(
    "--max-model-len",
    type=click.IntRange(min=16),
    default=1024,
    show_default=True,
    help="Context of the scoring engines; longer texts are scored in consecutive windows.",
)
@click.option("--min-agreement", type=float, help="Fail when top-1 agreement falls below this (0-1).")
@options.out_option("Results JSON [default: <run-dir>/eval.json].", file=True)
@allow_scale_loss_option
@kv_cache_gib_option
@enforce_eager_option
@run_dir_option
def eval_command(
    baseline: Path | None,
    candidate: Path | None,
    texts: Path | None,
    tp_size: int | None,
    with_fp8_kv: bool | None,
    max_model_len: int,
    min_agreement: float | None,
    out: Path | None,
    allow_scale_loss: bool,
    kv_cache_gib: float,
    enforce_eager: bool,
    run_dir: str | None,
) -> None:
    """Compare the FP8 model with its BF16 baseline: top-1 agreement, KL, perplexity.

    \b
    Example:
      ray-calib eval --baseline models/r1-bf16 --candidate calib-run/fp8 --min-agreement 0.9
    """
    tp = tp_size
    run = RunDir.resolve(run_dir)
    ui.library_logs(run.root, "eval")
    candidate = candidate or run.fp8
    if baseline is None:
        meta, _ = _run_meta(run, candidate)
        if not (meta and meta.model):
            raise click.UsageError("no --baseline and no model recorded in the run's meta; pass --baseline.")
        baseline = Path(meta.model)
    for model in (baseline, candidate):
        runner.check_model_dir(model)
    with_fp8_kv = runner.resolve_fp8_kv(candidate, with_fp8_kv)
    device = detect_device()
    # One engine at a time, so the larger (BF16) baseline decides; the candidate must allow the same TP.
    tp_size = runner.choose_tp(baseline, tp, device=device, kv_cache_gib=kv_cache_gib, max_model_len=max_model_len)
    runner.choose_tp(candidate, tp_size, device=device, kv_cache_gib=kv_cache_gib, max_model_len=max_model_len)
    report = fidelity.evaluate(
        baseline,
        candidate,
        _eval_texts(texts),
        tp_size=tp_size,
        device=device,
        with_fp8_kv=with_fp8_kv,
        max_model_len=max_model_len,
        engine_options={"kv_cache_gib": kv_cache_gib, "enforce_eager": enforce_eager},
    )
    dropped = sum(len(audit["dropped"]) for audit in report.scale_audit.values())
    verdict = _verdict(candidate, report.worst_agreement(), min_agreement, dropped, allow_scale_loss)
    path = fidelity.write_report(report, out or run.eval_json, verdict)
    if (record := read_record(run.root)) is not None and out is None:
        record_facts(record, "eval", {"eval": verdict})
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo(fidelity.format_table(report))
    click.echo(f"{report.num_positions} positions over {report.num_texts} texts; saved {path}")
    for name, audit in report.scale_audit.items():
        click.echo(f"{name}: ", nl=False)
        _report_audit(audit, allow_scale_loss)
    if min_agreement is not None and report.worst_agreement() < min_agreement:
        raise EngineError(
            f"top-1 agreement {report.worst_agreement():.3f} is below --min-agreement {min_agreement}",
            fix="inspect the ranges (`ray-calib report`), try another --scale-method, or measure more samples.",
        )
