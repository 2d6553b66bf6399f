"""`ray-calib measure`: record per-rank activation/weight ranges of a model at TP=N with vLLM."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from ray_calib import ui
from ray_calib.cli import options
from ray_calib.cli.engine_options import kv_cache_gib_option
from ray_calib.cli.options import run_dir_option
from ray_calib.cluster import devices
from ray_calib.data.formats import FORMATS
from ray_calib.engine import nodes
from ray_calib.errors import ConfigError, RayCalibError
from ray_calib.measure.plan import plan_measure, resolve_conf_path
from ray_calib.measure.preflight import cluster_address
from ray_calib.measure.quantizable import describe_backends
from ray_calib.measure.run import MeasureConfig, run_measure
from ray_calib.rundir import RunDir

DEFAULTS = {"batch_size": 16}  # without devices.conf


@options.command(renamed={"--limit": "--num-samples", "--cluster": "--conf"})
@click.option("-m", "--model", required=True, help="Local HF model directory or hub id ORG/NAME.")
@click.option(
    "-d",
    "--dataset",
    type=click.Path(path_type=Path),
    default=None,
    help="Calibration set (pile/mlcommons/tc); optional with --dry-run.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default=None,
    help="Calibration-set format [default: from the path, see `ray-calib dataset-info`].",
)
@options.tp_option(
    help="Tensor-parallel size [default: devices.conf TENSOR_PARALLEL_SIZE (else all its devices), else the "
    "smallest the model allows that fits in memory (1 on Gaudi)]."
)
@click.option("--fp8-kv", is_flag=True, help="Also measure K/V as written to the KV cache (for FP8 KV serving).")
@options.num_samples_option(512)
@options.least_tokens_option(
    help="Pile text: drop shorter samples, truncate longer ones [default: devices.conf CALIBRATION_SAMPLE_LENGTH]."
)
@click.option(
    "-b",
    "--batch-size",
    type=int,
    default=None,
    help="Prompts per generate call [default: devices.conf CALIBRATION_MAX_BATCH_SIZE, else 16].",
)
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Greedy tokens generated per prompt.")
@click.option("--chunk-size", type=int, default=64, show_default=True, help="Prompts per checkpoint.")
@options.out_option("Output directory [default: <run dir>/measure].")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoints.")
@click.option("--force", is_flag=True, help="Replace a finished measurement in --out.")
@click.option("--min-expert-tokens", type=int, default=0, help="Fail when a routed expert saw fewer tokens.")
@click.option(
    "--quant-config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="QUANT_CONFIG (measure) whose blocklist applies [default: devices.conf INC_MEASURE_CONFIG_FILENAME, "
    "else lm_head and the MoE router].",
)
@options.conf_option("devices.conf of a cluster started by `ray-calib up` [default: ./devices.conf when up].")
@click.option(
    "--executor",
    type=click.Choice(["auto", "uni", "mp", "ray"]),
    default="auto",
    show_default=True,
    help="How ranks run: one process, one node (mp) or Ray.",
)
@click.option(
    "--max-model-len",
    type=int,
    default=None,
    help="Longest prompt + generation [default: 2048, capped by the model's context].",
)
@kv_cache_gib_option
@options.device_option(
    runtime=True,
    help="Target device [env RAY_CALIB_DEVICE]; gaudi2/gaudi3 are taken as given (for --dry-run anywhere).",
)
@click.option(
    "--expert-parallel/--no-expert-parallel",
    default=None,
    help="Partition routed experts over the ranks (EP = TP) [default: on for MoE models measured by INC (Gaudi)].",
)
@options.engine_timeout_option()
@click.option("--enforce-eager", is_flag=True, help="Gaudi: run without HPU graphs (CPU/CUDA always run eager).")
@click.option(
    "--dry-run", is_flag=True, help="Print per node the engine arguments, env and QUANT_CONFIG; start nothing."
)
@click.option(
    "--attention-backend",
    default=None,
    help="Force vLLM's attention backend (e.g. CPU_MLA or AMX_MLA) [default: vLLM's choice].",
)
@click.option(
    "--hessians/--no-hessians",
    default=None,
    help="Record each linear layer's input sum(x xᵀ) (4 x in² bytes per layer and rank) so `quantize` rounds "
    "weights with GPTQ (CPU/CUDA) [default: when they take at most 1 GiB per rank].",
)
@click.option(
    "--ladder",
    is_flag=True,
    help="First run `ray-calib ladder` on the devices.conf's cluster with this model; stop at its first failure.",
)
@run_dir_option
def measure(
    model,
    dataset,
    fmt,
    tp_size,
    fp8_kv,
    num_samples,
    least_tokens,
    batch_size,
    max_new_tokens,
    chunk_size,
    out,
    resume,
    force,
    min_expert_tokens,
    quant_config,
    conf,
    executor,
    max_model_len,
    device,
    expert_parallel,
    timeout_s,
    enforce_eager,
    dry_run,
    attention_backend,
    kv_cache_gib,
    hessians,
    ladder,
    run_dir,
) -> None:
    """Run the calibration prompts through vLLM at TP=N and write one INC range file per rank.

    \b
    Examples:
      ray-calib measure -m /models/DeepSeek-R1 -d mlperf.pkl -t 16 --fp8-kv
      ray-calib measure -m /models/DeepSeek-R1 -t 16 --conf devices.conf --device gaudi2 --dry-run
    """
    cluster = conf
    conf = _load_conf(resolve_conf_path(cluster, any_state=dry_run))
    if tp_size is None:
        tp_size = conf.tensor_parallel_size if conf else None
    if batch_size is None:
        batch_size = _extra(conf, "CALIBRATION_MAX_BATCH_SIZE") or DEFAULTS["batch_size"]
    if least_tokens is None:
        least_tokens = _extra(conf, "CALIBRATION_SAMPLE_LENGTH")
    if quant_config is None and _extra(conf, "INC_MEASURE_CONFIG_FILENAME"):
        quant_config = Path(_extra(conf, "INC_MEASURE_CONFIG_FILENAME"))
    for flag, value in (
        ("--batch-size", batch_size),
        ("--chunk-size", chunk_size),
        ("--max-new-tokens", max_new_tokens),
        ("--num-samples", num_samples),
        ("--least-tokens", 1 if least_tokens is None else least_tokens),
        ("--max-model-len", max_model_len or 1),
        ("--timeout", timeout_s),
        ("--tp", tp_size or 1),
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}", fix=f"pass a positive {flag}.")
    if dataset is None and not dry_run:
        raise click.UsageError("Missing option '-d' / '--dataset'.")
    if ladder and not dry_run:  # before joining Ray: rung a needs no cluster up, only SSH
        _ladder(conf, model, run_dir)
    address = None if dry_run else _address(cluster, executor)
    run = RunDir.resolve(run_dir)
    out = (out or run.measure).absolute()
    config = MeasureConfig(
        run_root=run.root if out == run.measure else None,  # the run's own measure/ starts its run.json
        model=model,
        dataset=dataset,
        out=out,
        tp_size=tp_size,
        fp8_kv=fp8_kv,
        hessians=hessians,
        num_samples=num_samples,
        least_tokens=least_tokens,
        dataset_format=fmt,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        chunk_size=chunk_size,
        resume=resume,
        force=force,
        min_expert_tokens=min_expert_tokens,
        quant_config=quant_config,
        executor=executor,
        ray_address=address,
        max_model_len=max_model_len,
        device=device,
        expert_parallel=expert_parallel,
        timeout_s=timeout_s,
        enforce_eager=enforce_eager,
        cluster_conf=conf.path if conf else None,
        attention_backend=attention_backend,
        kv_cache_gib=kv_cache_gib,
    )
    if dry_run:
        _dry_run(config, conf, executor)
        return

    ui.library_logs(RunDir.resolve(run_dir).root, "measure")
    _run(config)


def _ladder(conf, model, run_dir) -> None:
    """`ray-calib ladder` before the real job, found through the CLI group (the ladder sits above the stages)."""
    if conf is None:
        raise ConfigError("--ladder checks a cluster: no devices.conf", fix="pass --conf devices.conf.")
    ctx = click.get_current_context()
    command = ctx.find_root().command.get_command(ctx, "ladder")  # type: ignore[attr-defined]
    ctx.invoke(command, conf=conf.path, model=Path(model), rungs=None, accept_new_host_keys=False, run_dir=run_dir)


def _load_conf(path: Path | None):
    if path is None:
        return None

    return devices.load(path)


def _extra(conf, key: str):
    return conf.extras.get(key) if conf else None


def _address(cluster: Path | None, executor: str) -> str | None:
    return cluster_address(cluster) if executor in ("auto", "ray") else None


def _dry_run(config, conf, executor: str) -> None:
    """The plan; the nodes are probed too when they can be (a cluster `up` started, or this node alone)."""
    address = None
    if conf is not None and executor in ("auto", "ray"):
        try:
            address = _address(conf.path, executor)
        except RayCalibError as err:
            click.echo(f"note: nodes not probed ({err.message})", err=True)
        config = dataclasses.replace(config, ray_address=conf.address)
    plan = plan_measure(config, load_data=config.dataset is not None, dry_run=True)
    if address or conf is None:
        _probe(plan)
    click.echo(plan.engine_plan().render())


def _probe(plan) -> None:
    """Per-node checks for the dry run: problems become warnings instead of errors."""
    plan.probe_nodes(write=False)
    try:
        nodes.check_nodes(plan.node_facts, str(plan.info.path), gaudi=plan.target.is_gaudi and not plan.target.forced)
        if plan.fit is not None:
            plan.fit.hosts = {f"{f.node} ({f.hostname})": f.mem_available for f in plan.node_facts}
            plan.warnings += [f"does not fit: {p}" for p in plan.fit.problems() if "host RAM" in p]
    except RayCalibError as err:
        plan.warnings.append(str(err))


def _run(config) -> None:
    summary = run_measure(config)
    click.echo(summary.data_summary)
    click.echo(
        f"measured {summary.num_prompts} prompts ({summary.num_tokens} tokens, {summary.generated_tokens} generated) "
        f"at TP {summary.world_size} on {summary.device} [{summary.executor}] in {summary.seconds:.1f} s; "
        f"{summary.chunks_reused}/{summary.chunks_total} chunks reused"
    )
    if summary.backends:
        click.echo(f"observed under {describe_backends(summary.backends)}")
    hessians = [f for f in summary.files if f.name.startswith("hessians_")]
    extra = f", and hessians for GPTQ ({sum(f.stat().st_size for f in hessians) / 2**20:,.0f} MiB)" if hessians else ""
    click.echo(f"wrote {summary.world_size} rank files ({summary.nodes_per_rank} nodes each){extra} to {summary.out}")
    for module, experts in summary.never_hit.items():
        click.echo(f"warning: {module}: experts {experts} got no tokens (their ranges are 0)", err=True)
