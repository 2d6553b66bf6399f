"""Expert parallelism in unify is one explicit decision: flag, else the meta's ep_size, else the files
checked against the model's config.json. TP-sharded experts (every rank holds all of them) are never
concatenated: that would give each expert's shard ranges to other experts' numbers."""

from __future__ import annotations

import json

import pytest

from ray_calib.errors import UnifyError
from ray_calib.inc import MeasurementSet, RunMeta, read_meta, write_meta
from ray_calib.measurements.pipeline import unify_dir
from tests.measurements.synthetic import write_set

OP = "model.layers.0.mlp.experts.moe_op"


def model_with(tmp_path, routed: int):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "n_routed_experts": routed}))
    return model


def measured(tmp_path, *, world: int, local: int, routed: int | None, ep_size: int | None):
    src = tmp_path / "measure"
    write_set(src, world, experts=local)
    model = model_with(tmp_path, routed) if routed else None
    write_meta(src, RunMeta(device_type="gaudi2", model=str(model) if model else None, tp_size=world, ep_size=ep_size))
    return src


def test_tp_sharded_experts_are_max_merged_when_config_json_says_so(tmp_path):
    """Each of 2 ranks holds all 4 routed experts: no meta ep_size, but config.json settles it."""
    src = measured(tmp_path, world=2, local=4, routed=4, ep_size=None)
    summary = unify_dir(src, tmp_path / "out", 1)
    assert not summary.expert_parallel and "TP-sharded" in summary.ep_reason
    out = MeasurementSet.discover(tmp_path / "out").read(0)
    assert len(out.nodes[OP]["outputs"]) == 1 + 4
    ranks = MeasurementSet.discover(src).read_all()
    assert out.nodes[OP]["outputs"][1] == max(r.nodes[OP]["outputs"][1] for r in ranks)
    assert read_meta(tmp_path / "out").ep_size == 1


def test_explicit_ep_on_tp_sharded_experts_is_refused(tmp_path):
    src = measured(tmp_path, world=2, local=4, routed=4, ep_size=None)
    with pytest.raises(UnifyError, match="holds all 4 routed experts"):
        unify_dir(src, tmp_path / "out", 1, expert_parallel=True)
    assert not (tmp_path / "out").exists()


def test_expert_parallel_files_are_concatenated(tmp_path):
    src = measured(tmp_path, world=4, local=2, routed=8, ep_size=None)
    summary = unify_dir(src, tmp_path / "out", 2)
    assert summary.expert_parallel and "4 ranks x 2 experts = 8 routed experts" in summary.ep_reason
    assert len(MeasurementSet.discover(tmp_path / "out").read(0).nodes[OP]["outputs"]) == 1 + 4
    assert read_meta(tmp_path / "out").ep_size == 2  # infer serves the unified files with EP 2


def test_meta_ep_size_decides_and_a_layout_that_fits_nothing_is_refused(tmp_path):
    src = measured(tmp_path, world=2, local=2, routed=None, ep_size=1)
    assert not unify_dir(src, tmp_path / "a", 1).expert_parallel
    src2 = tmp_path / "second"
    src2.mkdir()
    (tmp_path / "second" / "m").mkdir()
    bad = measured(src2, world=2, local=3, routed=8, ep_size=None)
    with pytest.raises(UnifyError, match="fits neither TP-sharded nor expert-parallel"):
        unify_dir(bad, src2 / "out", 1)


def test_flag_overrides_the_meta(tmp_path):
    src = measured(tmp_path, world=2, local=2, routed=None, ep_size=2)
    summary = unify_dir(src, tmp_path / "out", 1, expert_parallel=False)
    assert not summary.expert_parallel and summary.ep_reason == "--no-expert-parallel given"


def test_cli_prints_the_reason(tmp_path, run_cli):
    src = measured(tmp_path, world=2, local=4, routed=4, ep_size=None)
    result = run_cli("unify", "--to-tp", 1, "--in", src, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert "element-wise max (every rank holds all 4 routed experts (config.json): TP-sharded experts)" in result.stdout


def test_maverick_shape_is_refused_without_facts_and_max_merged_with_its_config(tmp_path, run_cli):
    """Llama-4-Maverick at TP=8: every rank holds shards of all 128 routed experts. With no meta and no
    config.json, unify used to assume expert parallelism and wrote 1,024 experts per rank."""
    src = tmp_path / "measure"
    write_set(src, 8, experts=128, layers=1)
    result = run_cli("unify", "--to-tp", 1, "--in", src, "--out", tmp_path / "out")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "8 ranks hold 128 routed experts each" in result.stderr and "--model" in result.stderr
    assert not (tmp_path / "out").exists()
    model = tmp_path / "maverick"
    model.mkdir()
    config = {"model_type": "llama4", "text_config": {"model_type": "llama4_text", "num_local_experts": 128}}
    (model / "config.json").write_text(json.dumps(config))
    result = run_cli("unify", "--to-tp", 1, "--in", src, "--out", tmp_path / "out", "--model", model)
    assert result.exit_code == 0, result.stderr
    assert "element-wise max (every rank holds all 128 routed experts (config.json)" in result.stdout
    out = MeasurementSet.discover(tmp_path / "out").read(0)
    assert len(out.nodes[OP]["outputs"]) == 1 + 128
    assert read_meta(tmp_path / "out").ep_size == 1
