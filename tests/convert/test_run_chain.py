"""Chains of valid commands that used to end in a wrong model: each now follows the run's record (run.json).

The measurements are the synthetic ones of `synthetic.write_measurements`, started as a run the way
`measure` starts one (`runrecord.start_record` with its facts and rank files), so the chain is
quantize -> infer/unify through the real CLI without a vLLM engine (`infer --dry-run` shows the engine).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from ray_calib.inc import read_meta, write_meta
from ray_calib.runrecord import config_digest, read_record, start_record
from tests.convert.synthetic import write_measurements

RUN_ID = "run-1"


def start_run(run: Path, model: Path, *, world: int = 2, fp8_kv: bool = True, seed: int = 0) -> Path:
    measure = run / "measure"
    write_measurements(measure, model, world_size=world, seed=seed)
    write_meta(measure, dataclasses.replace(read_meta(measure), run_id=RUN_ID, fp8_kv=fp8_kv))
    facts = {
        "model": str(model),
        "config_sha256": config_digest(model),
        "device_type": "cpu",
        "fp8_kv": fp8_kv,
        "measured_tp": world,
        "ep_size": 1,
        "expert_parallel": False,
    }
    files = sorted(p for p in measure.iterdir() if p.name != "ray_calib_meta.json")
    start_record(run, RUN_ID, "measure", facts, files)
    return run


def kv_scheme(checkpoint: Path):
    return json.loads((checkpoint / "config.json").read_text())["quantization_config"].get("kv_cache_scheme")


def one_line_error(result) -> str:
    assert result.exit_code != 0 and result.stderr.startswith("error: "), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr


def test_quantize_writes_the_kv_scales_measure_decided(tmp_path, tiny_llama, run_cli):
    """measure --fp8-kv, quantize without --fp8-kv, infer: used to give an FP8 cache at scale 1.0."""
    run = start_run(tmp_path / "run", tiny_llama)
    result = run_cli("quantize", "--run-dir", run, "--scale-method", "maxabs_pow2")
    assert result.exit_code == 0, result.stderr
    assert kv_scheme(run / "fp8") is not None and "--kv-cache-dtype fp8" in result.stdout
    record = read_record(run)
    assert record.value("fp8_kv") is True and record.by("fp8_kv") == "quantize"
    assert record.value("scale_method") == "maxabs_pow2" and record.value("format") == "compressed-tensors"
    shown = run_cli("infer", "--run-dir", run, "--device", "cpu", "--dry-run")
    assert shown.exit_code == 0, shown.stderr
    assert "KV cache" in shown.stdout and "fp8" in shown.stdout.split("KV cache", 1)[1].splitlines()[0]


def test_a_flag_against_the_record_is_refused_and_an_override_is_recorded(tmp_path, tiny_llama, run_cli):
    run = start_run(tmp_path / "run", tiny_llama)
    error = one_line_error(run_cli("quantize", "--run-dir", run, "--scale-method", "maxabs_pow2", "--no-fp8-kv"))
    for part in ("--no-fp8-kv", "fp8_kv = true", str(run / "run.json"), "new run", "--override-run"):
        assert part in error, error
    assert not (run / "fp8").exists()
    args = ("quantize", "--run-dir", run, "--scale-method", "maxabs_pow2", "--no-fp8-kv", "--override-run")
    assert run_cli(*args).exit_code == 0
    assert kv_scheme(run / "fp8") is None
    record = read_record(run)
    assert record.value("fp8_kv") is False
    assert record.overrides == [{"fact": "fp8_kv", "was": True, "now": False, "by": "quantize", "flag": "--no-fp8-kv"}]
    # the checkpoint has no k/v scales: an FP8 cache would run at 1.0, so it is refused, and not the default
    error = one_line_error(run_cli("infer", "--run-dir", run, "--device", "cpu", "--dry-run", "--fp8-kv"))
    assert "carries no k/v scales" in error and "scale 1.0" in error
    shown = run_cli("infer", "--run-dir", run, "--device", "cpu", "--dry-run")
    assert shown.exit_code == 0 and "bfloat16" in shown.stdout.split("KV cache", 1)[1].splitlines()[0]


def test_another_device_model_or_run_is_refused_naming_both(tmp_path, tiny_llama, tiny_deepseek, run_cli):
    run = start_run(tmp_path / "run", tiny_llama)
    error = one_line_error(run_cli("quantize", "--run-dir", run, "--device", "gaudi3"))
    assert "--device gaudi3" in error and 'device_type = "cpu"' in error
    error = one_line_error(run_cli("quantize", "--run-dir", run, "--model", tiny_deepseek))
    assert f"--model {tiny_deepseek}" in error and "differs from the measured model" in error
    other = tmp_path / "other"
    shutil.copytree(run / "measure", other)
    write_meta(other, dataclasses.replace(read_meta(other), run_id="run-2"))
    error = one_line_error(run_cli("quantize", "--run-dir", run, "--measurements", other))
    assert "run run-2" in error and "run run-1" in error
    assert not (run / "fp8").exists()


def test_the_runs_target_tp_wins_over_a_one_off_unify(tmp_path, tiny_llama, run_cli):
    """unify --to-tp 2 (the target), a one-off --to-tp 1: quantize used to take TP 1 (the smallest)."""
    run = start_run(tmp_path / "run", tiny_llama, world=4)
    assert run_cli("unify", "--run-dir", run, "--to-tp", 2).exit_code == 0
    one_off = run_cli("unify", "--run-dir", run, "--to-tp", 1)
    assert one_off.exit_code == 0 and "target stays TP 2" in one_off.stderr
    assert run_cli("quantize", "--run-dir", run, "--scale-method", "maxabs_pow2").exit_code == 0
    assert read_record(run).value("quantized") == str(run / "unified-tp2")
    assert run_cli("unify", "--run-dir", run, "--to-tp", 1, "--set-target").exit_code == 0
    assert run_cli("quantize", "--run-dir", run, "--scale-method", "maxabs_pow2", "--force").exit_code == 0
    record = read_record(run)
    assert record.value("quantized") == str(run / "unified-tp1") and record.value("target_tp") == 1
    assert {"fact": "target_tp", "was": 2, "now": 1, "by": "unify", "flag": "--set-target"} in record.overrides


def test_unify_refuses_a_rank_file_of_another_run(tmp_path, tiny_llama, run_cli):
    """Two runs of the same model and TP: a rank file of the second copied into the first used to unify."""
    run = start_run(tmp_path / "run", tiny_llama)
    second = tmp_path / "second"
    write_measurements(second, tiny_llama, world_size=2, seed=1)
    for rank_file in second.glob("*_1_2.*"):
        shutil.copy(rank_file, run / "measure" / rank_file.name)
    error = one_line_error(run_cli("unify", "--run-dir", run, "--to-tp", 1))
    assert "_1_2." in error and "run-1" in error and "sha256" in error
    assert not (run / "unified-tp1").exists()


def test_kv_scales_unit_or_calibrated_and_auto_without_a_validation_split(tmp_path, tiny_llama, run_cli):
    """--kv-scales unit writes 1.0 and records it; auto on a run whose dataset is unknown keeps the calibrated
    scales and says how to compare them (the scored choice runs in tests/measure/test_fp8_kv_chain.py)."""
    from tests.convert.test_quantize import tensors

    def kv_values(checkpoint: Path) -> list[float]:
        return [float(t) for name, t in tensors(checkpoint).items() if name.endswith(("k_scale", "v_scale"))]

    run = start_run(tmp_path / "run", tiny_llama)
    result = run_cli("quantize", "--run-dir", run, "--scale-method", "maxabs_pow2")
    assert result.exit_code == 0, result.stderr
    assert "no passages beyond the calibrated ones; pass --kv-validation TEXTS" in result.stdout
    calibrated = kv_values(run / "fp8")
    assert calibrated and 1.0 not in calibrated and read_record(run).value("kv_scales") is None
    result = run_cli("quantize", "--run-dir", run, "--scale-method", "maxabs_pow2", "--kv-scales", "unit")
    assert result.exit_code == 0, result.stderr
    assert kv_values(run / "fp8") == [1.0] * len(calibrated) and "k/v scales: 1.0" in result.stdout
    assert read_record(run).value("kv_scales") == {"chosen": "unit", "by": "--kv-scales unit"}
    result = run_cli("quantize", "--run-dir", run, "--scale-method", "maxabs_pow2", "--kv-scales", "calibrated")
    assert result.exit_code == 0, result.stderr
    assert kv_values(run / "fp8") == calibrated, "a rerun writes the measured scales again"


def test_an_empty_kv_validation_file_is_one_line(tmp_path, tiny_llama, run_cli):
    run = start_run(tmp_path / "run", tiny_llama)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    result = run_cli("quantize", "--run-dir", run, "--scale-method", "maxabs_pow2", "--kv-validation", empty)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 1 and errors == [f"error: {empty}: holds no prompts; write one prompt per line."]
    assert "Traceback" not in result.stderr
