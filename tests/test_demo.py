"""The README's main job, end to end (`make demo`): every artefact it promises exists afterwards."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.cluster
@pytest.mark.timeout(2400)
def test_demo_runs_the_whole_pipeline(tmp_path):
    env = {**os.environ, "RAY_CALIB_DEMO_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "ray_calib.testing.demo"], env=env, capture_output=True, text=True, timeout=2400
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "run"
    assert len(list((run / "measure").glob("inc_measure_output_hooks_maxabs_*_4.npz"))) == 4
    assert len(list((run / "unified-tp2").glob("inc_measure_output_hooks_maxabs_*_2.npz"))) == 2
    config = json.loads((run / "fp8" / "config.json").read_text())
    assert config["quantization_config"]
    assert json.loads((run / "eval.json").read_text())["top1_agreement"]
    assert list((run / "report").glob("*.png"))
    assert list((tmp_path / "hub" / "repos").rglob("repo.json"))
    assert "All stages done" in result.stdout
    # the real model: measured at TP=3 across both nodes, unified to 1, FP8 answers and figures
    smol = tmp_path / "run-smollm2"
    assert len(list((smol / "measure").glob("inc_measure_output_hooks_maxabs_*_3.npz"))) == 3
    meta = json.loads((smol / "measure" / "ray_calib_meta.json").read_text())
    assert meta["tp_size"] == 3 and meta["fp8_kv"]
    answers = {row["prompt"]: row for row in json.loads((smol / "infer" / "completions.json").read_text())}
    assert answers["The capital of France is"]["candidate"].strip().startswith("Paris")
    report = json.loads((smol / "eval.json").read_text())
    assert report["kv_cache_dtype"] == {"baseline": "bfloat16", "candidate": "bfloat16", "candidate_fp8_kv": "fp8"}
    assert report["top1_agreement"]["candidate"] >= 0.8
