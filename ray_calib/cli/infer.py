"""`ray-calib infer` and `ray-calib eval`: thin commands over `infer.stage` (serving stays here: it waits on
the user's Ctrl-C)."""

from __future__ import annotations

import signal
from pathlib import Path

import click

from ray_calib import ui
from ray_calib.cli import options
from ray_calib.cli.engine_options import enforce_eager_option, kv_cache_gib_option, max_model_len_option
from ray_calib.cli.options import run_dir_option
from ray_calib.data.texts import default_heldout
from ray_calib.engine.device import detect_target
from ray_calib.infer import fidelity, runner, stage
from ray_calib.infer.audit import ScaleAudit, check
from ray_calib.infer.compare import format_side_by_side
from ray_calib.rundir import RunDir

_dir = click.Path(file_okay=False, path_type=Path)
_file = click.Path(dir_okay=False, path_type=Path)
allow_scale_loss_option = click.option(
    "--allow-scale-loss",
    is_flag=True,
    help="Go on when the engine does not use a scale the FP8 checkpoint carries (the audit names it).",
)


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
    request = stage.InferRequest(
        run=RunDir.resolve(run_dir),
        target=detect_target(device),
        model=model,
        tp=tp_size,
        conf=conf,
        fp8_kv=fp8_kv,
        quant_config=quant_config,
        timeout_s=timeout_s,
        startup_timeout_s=startup_timeout,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        kv_cache_gib=kv_cache_gib,
        skip_warmup=skip_warmup,
        enforce_eager=enforce_eager,
        allow_device_mismatch=allow_device_mismatch,
        dry_run=dry_run,
    )
    infer_plan = stage.plan(request)
    for line in infer_plan.resolved.warnings:
        ui.warn(line)
    for line in infer_plan.resolved.notes:
        click.echo(line)
    if dry_run:
        click.echo(stage.dry_run(infer_plan, serve=serve, host=host, port=port).render())
        return
    config, run = infer_plan.config, request.run
    ui.library_logs(run.root, "infer")
    ui.note(
        f"vLLM on {request.target.device_type}, TP={config.tp_size}, KV cache "
        f"{runner.engine_config(config).kv_cache_dtype}; start-up wait {config.startup_timeout_s or timeout_s} s, "
        f"step timeout {timeout_s} s"
    )
    if serve:
        _serve(config, host, port, detach, run, allow_scale_loss)
        return
    result = stage.run(infer_plan, runner.load_prompts(prompts), max_new_tokens=max_new_tokens, baseline=baseline)
    if baseline is not None:
        click.echo(format_side_by_side(result.completions))
        click.echo(f"{sum(r.same for r in result.completions)} of {len(result.completions)} answers identical")
    else:
        for completion in result.completions:
            click.echo(f"> {completion.prompt}\n  {completion.text.strip()!r} ({completion.num_tokens} tokens)")
    click.echo(f"completions saved to {result.saved}")
    _report_audit(result.audit, allow_scale_loss)


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


def _json(audit: ScaleAudit | None) -> dict | None:
    return audit.to_json() if audit else None


def _serve(config, host: str, port: int, detach: bool, run: RunDir, allow_scale_loss: bool) -> None:
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
        elif runner.auditable(config):
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
@click.option(
    "--candidate",
    type=_dir,
    help="The FP8 model [default: <run-dir>/fp8; on Gaudi the measured model under INC's QUANTIZE, or a "
    "compressed-tensors checkpoint given here].",
)
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
@click.option(
    "--quant-config",
    type=_file,
    help="Gaudi: the candidate's QUANTIZE QUANT_CONFIG [default: the run's one-node config, written if absent].",
)
@options.device_option(runtime=True, help="Target device [env RAY_CALIB_DEVICE]; gaudi2/gaudi3 taken as given.")
@click.option("--dry-run", is_flag=True, help="Print the settings of both engines; score nothing.")
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
    quant_config: Path | None,
    device: str,
    dry_run: bool,
    kv_cache_gib: float,
    enforce_eager: bool,
    run_dir: str | None,
) -> None:
    """Compare the FP8 model with its BF16 baseline: top-1 agreement, KL, perplexity.

    \b
    Example:
      ray-calib eval --baseline models/r1-bf16 --candidate calib-run/fp8 --min-agreement 0.9
    """
    run = RunDir.resolve(run_dir)
    request = stage.EvalRequest(
        run=run,
        texts=[] if dry_run else _eval_texts(texts),
        baseline=baseline,
        candidate=candidate,
        tp=tp_size,
        with_fp8_kv=with_fp8_kv,
        max_model_len=max_model_len,
        min_agreement=min_agreement,
        out=out,
        allow_scale_loss=allow_scale_loss,
        kv_cache_gib=kv_cache_gib,
        enforce_eager=enforce_eager,
        target=detect_target(device),
        quant_config=quant_config,
        dry_run=dry_run,
    )
    if dry_run:
        plan = stage.eval_plan(request)
        click.echo(f"ray-calib eval --dry-run: nothing is started; TP {plan.tp_size} on {plan.device}")
        for name, settings in stage.eval_engines(request, plan).items():
            click.echo(f"{name}: " + ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None))
        return
    ui.library_logs(run.root, "eval")
    result = stage.evaluate(request)
    report = result.report
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo(fidelity.format_table(report))
    click.echo(f"{report.num_positions} positions over {report.num_texts} texts; saved {result.saved}")
    for name, audit in report.scale_audit.items():
        click.echo(f"{name}: ", nl=False)
        _report_audit(audit, allow_scale_loss)
    result.check(min_agreement)
