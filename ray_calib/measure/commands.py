"""`ray-calib measure`: record per-rank activation/weight ranges of a model at TP=N with vLLM."""

from __future__ import annotations

from pathlib import Path

import click

from ray_calib.rundir import RunDir, run_dir_option


@click.command()
@click.option("-m", "--model", required=True, help="Local HF model directory or hub id ORG/NAME.")
@click.option("-d", "--dataset", required=True, type=click.Path(path_type=Path), help="Calibration set (pile/mlcommons/tc).")
@click.option("-t", "--tp", "tp_size", type=int, default=1, show_default=True, help="Tensor-parallel size.")
@click.option("--fp8-kv", is_flag=True, help="Also measure K/V as written to the KV cache (for FP8 KV serving).")
@click.option("-n", "--num-samples", "--limit", "num_samples", type=int, default=512, show_default=True, help="Prompts to use.")
@click.option("-l", "--least-tokens", type=int, default=None, help="Pile text: drop shorter samples, truncate longer ones.")
@click.option("-b", "--batch-size", type=int, default=16, show_default=True, help="Prompts per generate call.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Greedy tokens generated per prompt.")
@click.option("--chunk-size", type=int, default=64, show_default=True, help="Prompts per checkpoint.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory [default: <run dir>/measure].")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoints.")
@click.option("--force", is_flag=True, help="Replace a finished measurement in --out.")
@click.option("--min-expert-tokens", type=int, default=0, help="Fail when a routed expert saw fewer tokens.")
@click.option("--quant-config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="QUANT_CONFIG (measure) whose blocklist applies [default: lm_head and the MoE router].")
@click.option("--conf", "--cluster", "cluster", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="devices.conf of a cluster started by `ray-calib up` [default: ./devices.conf when up].")
@click.option("--executor", type=click.Choice(["auto", "uni", "mp", "ray"]), default="auto", show_default=True,
              help="How ranks run: one process, one node (mp) or Ray.")
@click.option("--max-model-len", type=int, default=2048, show_default=True, help="Longest prompt + generation.")
@click.option("--attention-backend", default=None,
              help="Force vLLM's attention backend (e.g. CPU_MLA or AMX_MLA) [default: vLLM's choice].")
@run_dir_option
def measure(model, dataset, tp_size, fp8_kv, num_samples, least_tokens, batch_size, max_new_tokens, chunk_size, out,
            resume, force, min_expert_tokens, quant_config, cluster, executor, max_model_len, attention_backend,
            run_dir) -> None:
    """Run the calibration prompts through vLLM at TP=N and write one INC range file per rank."""
    from ray_calib.errors import ConfigError
    from ray_calib.measure.preflight import cluster_address
    from ray_calib.measure.progress import RichProgress
    from ray_calib.measure.run import MeasureConfig, run_measure

    for flag, value in (("--batch-size", batch_size), ("--chunk-size", chunk_size), ("--max-new-tokens", max_new_tokens),
                        ("--num-samples", num_samples), ("--least-tokens", least_tokens or 1),
                        ("--max-model-len", max_model_len or 1)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}", fix=f"pass a positive {flag}.")
    address = cluster_address(cluster) if executor in ("auto", "ray") else None
    config = MeasureConfig(model=model, dataset=dataset, out=(out or RunDir.resolve(run_dir).measure).absolute(),
                           tp_size=tp_size, fp8_kv=fp8_kv, num_samples=num_samples, least_tokens=least_tokens,
                           batch_size=batch_size, max_new_tokens=max_new_tokens, chunk_size=chunk_size, resume=resume,
                           force=force, min_expert_tokens=min_expert_tokens, quant_config=quant_config,
                           executor=executor, ray_address=address, max_model_len=max_model_len,
                           attention_backend=attention_backend)
    progress = RichProgress()
    try:
        summary = run_measure(config, progress)
    finally:
        progress.stop()
    click.echo(summary.data_summary)
    click.echo(f"measured {summary.num_prompts} prompts ({summary.num_tokens} tokens, {summary.generated_tokens} generated) "
               f"at TP {summary.world_size} on {summary.device} [{summary.executor}] in {summary.seconds:.1f} s; "
               f"{summary.chunks_reused}/{summary.chunks_total} chunks reused")
    if summary.backends:
        from ray_calib.measure.quantizable import describe_backends

        click.echo(f"observed under {describe_backends(summary.backends)}")
    click.echo(f"wrote {summary.world_size} rank files ({summary.nodes_per_rank} nodes each) to {summary.out}")
    for module, experts in summary.never_hit.items():
        click.echo(f"warning: {module}: experts {experts} got no tokens (their ranges are 0)", err=True)
