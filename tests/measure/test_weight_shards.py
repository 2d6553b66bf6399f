"""Scales with `--weights` from the checkpoint shards equal the scales of the weight ranges measured in vLLM."""

from __future__ import annotations

import pytest

from ray_calib.inc import MeasurementSet

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch", [pytest.param("llama", marks=pytest.mark.extended), "deepseek_v3"])
def test_shards_are_what_vllm_holds_at_tp2(tmp_path, run_cli, tiny_models, measured, arch):
    """A real TP2 measurement records each rank's weight max from the shard vLLM loaded; the checkpoint shards
    must give the same scale for every weight node."""
    model = tiny_models[arch]
    run = measured(arch, 2, True)  # the runs test_measure_runs.py checks
    for weights in (False, True):
        result = run_cli(
            "scales",
            "--scale-method",
            "maxabs_arbitrary",
            "--device",
            "gaudi3",
            "--in",
            run.out,
            "--out",
            tmp_path / f"scales-{weights}",
            *(("--weights", model) if weights else ()),
        )
        assert result.exit_code == 0, result.stderr
    measured_scales, sharded = (
        MeasurementSet.discover(tmp_path / f"scales-{w}", method="MAXABS_ARBITRARY").read_all() for w in (False, True)
    )
    compared = 0
    for rank in range(2):
        for name, node in sharded[rank].nodes.items():
            if "weight" in node["params"]:
                assert node["params"]["weight"] == measured_scales[rank].nodes[name]["params"]["weight"], (rank, name)
                compared += 1
    assert compared > 10
    assert f"{compared} weight scales from {model}" in result.stdout  # every weight node found its shards
