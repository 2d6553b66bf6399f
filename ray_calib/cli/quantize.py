"""`ray-calib quantize` and `convert-bf16`: thin commands over `convert.pipeline` and `convert.bf16`.

With an FP8 KV cache on CPU/CUDA, `quantize` then makes the run's one engine-backed choice that belongs to
the checkpoint: calibrated k/v scales or vLLM's scale 1.0, whichever scores better on a validation split
(`infer.kv_choice`); the loser is not written, and run.json records the figures.
"""

from __future__ import annotations

from pathlib import Path

import click

from ray_calib import ui
from ray_calib.cli import options
from ray_calib.cli.engine_options import default_kv_cache_gib
from ray_calib.cli.options import run_dir_option
from ray_calib.convert.bf16 import convert_to_bf16
from ray_calib.convert.pipeline import QuantizeRequest, QuantizeResult, quantize_run
from ray_calib.convert.quantize import set_kv_scales
from ray_calib.convert.scale_choice import DEFAULT
from ray_calib.data import validation_prompts
from ray_calib.engine import gaudi
from ray_calib.engine.device import detect_device
from ray_calib.inc import read_meta
from ray_calib.infer import runner
from ray_calib.infer.kv_choice import CALIBRATED, UNIT, choose_kv_scales
from ray_calib.model.config import model_config
from ray_calib.rundir import RunDir
from ray_calib.runrecord import RunRecord, read_record, record_facts

_dir = click.Path(file_okay=False, path_type=Path)
VALIDATION_PASSAGES = 8  # of the calibration dataset, after the calibrated ones: the k/v choice's split
KV_CHOICE_CONTEXT = 1024  # the scoring engines' context; longer passages are scored in windows


@click.command()
@click.option("--model", type=_dir, help="BF16 model directory [default: the model named in the measurements' meta].")
@click.option(
    "--measurements",
    type=_dir,
    help="Measurement dir [default: <run-dir>/unified-tp<smallest> (Gaudi: the largest TP up to 8), else measure].",
)
@options.out_option("Output directory [default: <run-dir>/fp8; on Gaudi <run-dir>/configs].")
@options.scale_method_option(
    "INC scale method [default: maxabs_hw on Gaudi; on CPU/CUDA the scales "
    "chosen by measured quality, convert/scale_choice.py]."
)
@options.device_option("Target [default: from meta].")
@click.option(
    "--fp8-kv/--no-fp8-kv",
    default=None,
    help="Write k/v scales for an FP8 KV cache [default: as recorded by measure in run.json, else the meta].",
)
@options.override_run_option
@click.option("--low-cpu-mem", is_flag=True, help="Hold at most one tensor (and its FP8 copy) in memory.")
@click.option("--input-backoff", type=float, help="Activation backoff (INC scale_params.input_backoff, default 0.25).")
@click.option("--weight-backoff", type=float, help="Weight backoff (INC scale_params.weight_backoff, default 0.5).")
@click.option(
    "--inc-version",
    help="Gaudi: the INC release that reads the QUANT_CONFIG; backoffs go to "
    "scale_params up to 3.4, into a dict-form scale_method from 3.5 [default: the newest].",
)
@click.option(
    "--weight-strategy",
    type=click.Choice(["tensor", "channel"]),
    help="CPU/CUDA FP8 weight scales: one per tensor or one per output channel (compressed-tensors "
    "strategy) [default: chosen by measured quality, convert/scale_choice.py].",
)
@click.option(
    "--gptq/--no-gptq",
    default=None,
    help="CPU/CUDA: round weights with GPTQ using the hessians of `measure --hessians` "
    "[default: when the measurements hold them].",
)
@click.option(
    "--format",
    "format",
    type=click.Choice(["inc", "compressed-tensors"]),
    help="Gaudi: `inc` writes INC's QUANT_CONFIG (weights stay BF16); `compressed-tensors` writes an FP8 "
    "checkpoint vllm-gaudi loads as is (<run-dir>/fp8-gaudi2|3) [default: inc on Gaudi; CPU/CUDA: "
    "compressed-tensors only].",
)
@click.option(
    "--also-cuda",
    is_flag=True,
    help="With --format compressed-tensors on Gaudi: also write the CPU/CUDA checkpoint (<run-dir>/fp8).",
)
@click.option(
    "--kv-scales",
    type=click.Choice(["auto", CALIBRATED, UNIT]),
    default="auto",
    show_default=True,
    help="With an FP8 KV cache on CPU/CUDA: `auto` scores the calibrated k/v scales against vLLM's scale 1.0 "
    f"(BF16 as reference) on {VALIDATION_PASSAGES} passages of the run's dataset that were not calibrated on "
    "(or --kv-validation) and writes the better; `calibrated` or `unit` (1.0) write one without scoring.",
)
@click.option(
    "--kv-validation",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Validation texts for --kv-scales auto, one per line or JSONL with 'text' [default: the passages of "
    "the run's dataset right after the calibrated ones].",
)
@click.option("--clean-stale-scales", is_flag=True, help="Delete old *_MAXABS* scale files next to the measurements.")
@click.option("--force", is_flag=True, help="Redo an --out that holds another run's output.")
@run_dir_option
def quantize(run_dir: str | None, kv_scales: str, kv_validation: Path | None, **flags) -> None:
    """Write an FP8 checkpoint vLLM loads (or, on Gaudi, the QUANT_CONFIG for --quantization inc).

    \b
    Examples:
      ray-calib quantize --low-cpu-mem                     # after measure/unify in ./calib-run
      ray-calib quantize --model M --measurements DIR --out OUT --scale-method maxabs_pow2 --fp8-kv
      ray-calib quantize --device gaudi2 --format compressed-tensors --also-cuda   # vllm-gaudi + CPU/CUDA
    """
    run = RunDir.resolve(run_dir)
    result = quantize_run(QuantizeRequest(run=run, **flags))
    if result.stale and not result.cleaned:
        ui.warn(
            f"{len(result.stale)} stale scale file(s) next to the measurements (e.g. "
            f"{result.stale[0].name}) would override them in INC; rerun with --clean-stale-scales"
        )
    if result.inc_config:
        click.echo(
            f"{result.device}: weights stay as they are, INC quantizes at load with {result.method}. Serve with:\n"
            f"  {_inc_serve_hint(result, result.fp8_kv)}\n  (or `ray-calib infer --serve`, which also bounds the "
            "context and checks the fit)"
        )
        return
    assert result.summary is not None, "quantize_run summarizes every checkpoint it writes"
    on_gaudi = result.device.startswith("gaudi")
    target = "vllm-gaudi " + result.device if on_gaudi else "CPU/CUDA"
    _echo_summary(result.summary, result.method, target, result.fp8_kv)
    if result.cuda_summary is not None:
        _echo_summary(result.cuda_summary, DEFAULT.name, "CPU/CUDA", result.fp8_kv)
    cpu_cuda = result.cuda_summary or (None if on_gaudi else result.summary)
    if result.fp8_kv and cpu_cuda is not None and kv_scales != CALIBRATED:
        _choose_kv_scales(run, result, cpu_cuda.out, kv_scales, kv_validation)


def _choose_kv_scales(run: RunDir, result: QuantizeResult, out: Path, mode: str, texts_file: Path | None) -> None:
    """Keep the calibrated k/v scales in `out`, or set them to 1.0: as asked, or (auto) by validation KL."""
    record = read_record(run.root)
    if mode == UNIT:
        if set_kv_scales(out, 1.0):
            _record_kv_choice(record, {"chosen": UNIT, "by": "--kv-scales unit"})
            click.echo("k/v scales: 1.0 (--kv-scales unit), as vLLM runs an FP8 cache without calibration")
        return
    texts = runner.load_prompts(texts_file) if texts_file else _validation_split(record, result.model)
    if not texts:
        click.echo(
            "note: k/v scales: kept the calibrated ones without comparing them with scale 1.0: the run's dataset "
            "holds no passages beyond the calibrated ones; pass --kv-validation TEXTS, or --kv-scales calibrated|unit"
        )
        return
    ui.library_logs(run.root, "quantize")  # the scoring engines' logs go to <run dir>/logs/, not the screen
    device = detect_device()
    kv_cache_gib = default_kv_cache_gib()
    tp_size = runner.choose_tp(
        result.model, None, device=device, kv_cache_gib=kv_cache_gib, max_model_len=KV_CHOICE_CONTEXT
    )
    ui.note(f"k/v scales: calibrated or 1.0? scoring both on {len(texts)} validation passages")
    choice = choose_kv_scales(
        result.model,
        out,
        texts,
        tp_size=tp_size,
        device=device,
        max_model_len=KV_CHOICE_CONTEXT,
        engine_options={"kv_cache_gib": kv_cache_gib, "enforce_eager": True},
    )
    if choice is None:
        return
    if choice.chosen == UNIT:
        set_kv_scales(out, 1.0)
    _record_kv_choice(record, choice.to_json())
    click.echo(f"k/v scales: {'calibrated' if choice.chosen == CALIBRATED else '1.0'}: {choice.reason()}")


def _validation_split(record: RunRecord | None, model: Path) -> list[str]:
    """The run's dataset passages right after the calibrated ones, taken as measure took those."""
    if record is None or not record.value("dataset") or record.value("num_samples") is None:
        return []
    prompts = validation_prompts(
        record.value("dataset"),
        model,
        record.value("dataset_format"),
        calibrated=record.value("num_samples"),
        dataset_hash=record.value("dataset_hash"),
        count=VALIDATION_PASSAGES,
        least_tokens=record.value("least_tokens"),
    )
    return [p.text for p in prompts]


def _record_kv_choice(record: RunRecord | None, choice: dict) -> None:
    if record is not None:
        record_facts(record, "quantize", {"kv_scales": choice})


def _inc_serve_hint(result, fp8_kv: bool) -> str:
    """The `vllm serve` line for this checkpoint route on Gaudi, with the env and arguments the route needs."""
    route = gaudi.route_for(model_config(result.model), str(result.model))
    meta = read_meta(result.measurements)
    tp = meta.tp_size if meta and meta.tp_size else None
    env = {"QUANT_CONFIG": str(result.inc_config), **gaudi.SERVE_ENV, **route.env}
    if tp and tp > 1:
        env.update(gaudi.LAZY_COLLECTIVES)
    args = [f"--quantization {route.quantization}"] if route.quantization else []
    args += [f"--tensor-parallel-size {tp}"] if tp else []
    args += ["--enable-expert-parallel"] if meta and meta.ep_size and meta.ep_size > 1 else []
    args += ["--trust-remote-code", "--kv-cache-dtype fp8_inc" if fp8_kv else ""]
    line = " ".join(f"{k}={v}" for k, v in env.items()) + f" vllm serve {result.model} " + " ".join(args)
    return line.rstrip()


def _echo_summary(s, method: str, target: str, fp8_kv: bool) -> None:
    took = sum(s.seconds.values())
    click.echo(
        f"wrote {s.out}: {s.quantized} FP8 tensors, {s.kept} kept, {len(s.shards_written)} shard(s) written, "
        f"{len(s.shards_skipped)} already done (checksum verified); {s.input_bytes / 1e9:.2f} GB -> "
        f"{s.output_bytes / 1e9:.2f} GB, method {method}{', GPTQ rounding' if s.gptq else ''} (for {target})"
    )
    click.echo("time: " + ", ".join(f"{k} {v:.2f} s" for k, v in s.seconds.items()) + f" (total {took:.2f} s)")
    for note in s.notes + (
        [f"{len(s.filled_experts)} expert(s) saw no tokens: given their layer's largest range"]
        if s.filled_experts
        else []
    ):
        click.echo(f"note: {note}")
    if target.startswith("vllm-gaudi"):  # vllm-gaudi turns a kv_cache_scheme into its fp8_inc cache
        click.echo(f"serve on Gaudi: vllm serve {s.out}{' --kv-cache-dtype fp8_inc' if fp8_kv else ''}")
        return
    click.echo(f"serve: vllm serve {s.out}{' --kv-cache-dtype fp8' if fp8_kv else ''}")


@click.command("convert-bf16")
@click.option("--in", "src", type=_dir, required=True, help="Block-FP8 checkpoint (e.g. DeepSeek-R1).")
@options.out_option("Where the BF16 checkpoint goes.", required=True)
@click.option("--force", is_flag=True, help="Redo an --out that holds another conversion.")
def convert_bf16(src: Path, out: Path, force: bool) -> None:
    """Dequantize DeepSeek's block-FP8 weights (128x128, weight_scale_inv) to BF16, shard by shard.

    \b
    Example:
      ray-calib convert-bf16 --in DeepSeek-R1 --out DeepSeek-R1-bf16
    """
    s = convert_to_bf16(src, out, force=force)
    click.echo(
        f"wrote {s.out}: {s.converted} tensors dequantized, {len(s.shards_written)} shard(s) written, "
        f"{len(s.shards_skipped)} already done; {s.output_bytes / 1e9:.2f} GB"
    )
