"""The README's main job, end to end (`make demo`): every artefact it promises exists afterwards."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.cluster
def test_demo_runs_the_whole_pipeline(tmp_path):
    env = {**os.environ, "RAY_CALIB_DEMO_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "ray_calib.demo"], env=env, capture_output=True, text=True,
                            timeout=1500)
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
