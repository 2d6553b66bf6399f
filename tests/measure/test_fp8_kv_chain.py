"""The FP8-KV chain end to end with real vLLM on the tiny Llama: measure --fp8-kv (the session's run), unify,
quantize without --fp8-kv, infer (SmolLM2's chain is the demo's, tests/test_demo.py). The run's record
carries FP8 KV from measure to the engine; the chain used to write no k/v scales and serve an FP8 cache at
scale 1.0 unasked. Quantize now scores calibrated k/v scales against 1.0 on a validation split and writes the
better; the engine's scale audit then reads back that every scale the checkpoint carries is in use."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from ray_calib.inc import read_meta
from ray_calib.runrecord import read_record
from tests.convert.test_quantize import tensors


@pytest.mark.slow
def test_fp8_kv_chain_measure_unify_quantize_infer(measured, tmp_path, run_cli, monkeypatch):
    source = measured("llama", 2, True)
    run = tmp_path / "run"
    shutil.copytree(source.out.parent, run)  # the measure run's own directory: measure/ and its run.json
    record = read_record(run)
    meta = read_meta(run / "measure")
    assert record is not None and record.run_id == meta.run_id
    assert record.value("fp8_kv") is True and record.by("fp8_kv") == "measure"
    assert record.value("measured_tp") == 2 and record.value("dataset_hash") == meta.dataset_hash
    assert {e["file"] for e in record.rank_files} >= {f"measure/{p.name}" for p in (run / "measure").glob("*.npz")}

    assert run_cli("unify", "--run-dir", run, "--to-tp", 1).exit_code == 0
    result = run_cli("quantize", "--run-dir", run)
    assert result.exit_code == 0, result.stderr
    config = json.loads((run / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["kv_cache_scheme"] is not None
    # calibrated k/v scales or 1.0, scored on the dataset's passages after the calibrated ones (real engines)
    choice = read_record(run).value("kv_scales")
    kl = choice["mean_kl"]
    assert choice["texts"] > 0 and kl["calibrated"] != kl["unit"], choice  # the FP8 cache acts either way
    assert choice["chosen"] == ("unit" if kl["unit"] < kl["calibrated"] else "calibrated"), choice
    assert f"k/v scales: {'1.0' if choice['chosen'] == 'unit' else 'calibrated'}: " in result.stdout
    kv = [float(t) for name, t in tensors(run / "fp8").items() if name.endswith(("k_scale", "v_scale"))]
    assert len(kv) == 8 and (set(kv) == {1.0}) == (choice["chosen"] == "unit"), kv

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    result = run_cli("infer", "--run-dir", run, "--max-new-tokens", 4, "--enforce-eager")
    assert result.exit_code == 0, result.stderr
    assert "KV cache fp8" in result.stderr
    # read back from the engine: every weight, input and k/v scale of the checkpoint is in use
    audit = re.search(r"scale audit: (\d+)/(\d+) weight, (\d+)/(\d+) input, (\d+)/(\d+) kv in use", result.stdout)
    assert audit, result.stdout
    used, carried = audit.groups()[::2], audit.groups()[1::2]
    assert used == carried and carried[2] == "4", audit.group(0)  # the tiny Llama's 4 attention layers
    assert len(json.loads((run / "infer" / "completions.json").read_text())) == 4
