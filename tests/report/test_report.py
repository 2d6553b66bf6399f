"""`ray-calib report` on synthetic runs with known figures and on the real INC fixtures."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from ray_calib.cli import cli
from ray_calib.inc import ExpertCoverage, RankFile, RunMeta, StatsName, write_coverage, write_meta, write_rank_file
from ray_calib.inc.naming import MEASURE_PREFIX
from ray_calib.report.build import build_report, load_run
from ray_calib.report.extract import figures, leaf_max
from ray_calib.rundir import RunDir

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures"
LAYERS, EXPERTS = 4, 8


def _synthetic_run(
    root: Path,
    *,
    world_size: int,
    kv_scale: float,
    seed: int,
    mla: bool = False,
    never_hit: tuple[tuple[int, int], ...] = (),
) -> RunDir:
    """A TP=`world_size` measurement: per-layer KV maxabs = kv_scale * (layer + 1) on the last rank only,
    so the TP1 max (what unify gives) is known; linear inputs/weights random but below known bounds."""
    rng = random.Random(seed)
    run = RunDir(root)
    for rank in range(world_size):
        nodes = {}
        for layer in range(LAYERS):
            prefix = f"model.layers.{layer}.self_attn"
            kv = kv_scale * (layer + 1) if rank == world_size - 1 else kv_scale * 0.5
            if mla:
                nodes[f"{prefix}.mla_attn.impl.latent_cache_k"] = {"inputs": [[[kv]]]}
            else:
                nodes[f"{prefix}.attn.impl.k_cache"] = {"inputs": [[[kv]]]}
                nodes[f"{prefix}.attn.impl.v_cache"] = {"inputs": [[[kv / 4]]]}
            nodes[f"{prefix}.o_proj"] = {
                "inputs": [[[rng.uniform(1, 2)]]],
                "outputs": [[[1.0]], [[2.0]]],
                "params": {"weight": [[rng.uniform(0.1, 0.2)], [0.05]]},
            }
            nodes[f"model.layers.{layer}.mlp.down_proj"] = {
                "inputs": [[[10.0 * (layer + 1)]]],
                "params": {"weight": [[0.5]]},
            }
        name = StatsName(MEASURE_PREFIX, rank=rank, world_size=world_size)
        write_rank_file(RankFile(name=name, nodes=nodes), run.measure)
    write_meta(
        run.measure,
        RunMeta(
            model="tiny", dataset="/data/pile.jsonl", num_samples=16, num_tokens=16 * 64, tp_size=world_size, ep_size=1
        ),
    )
    experts = {
        f"model.layers.{layer}.mlp.experts": [
            0 if (layer, e) in never_hit else rng.randint(1, 500) for e in range(EXPERTS)
        ]
        for layer in range(1, LAYERS)
    }
    write_coverage(run.measure, ExpertCoverage(experts=experts, num_tokens=1024))
    return run


def test_leaf_max_handles_every_leaf_shape_and_flags_non_finite():
    assert leaf_max([[0.5]]) == 0.5 and leaf_max([[0.1], [-3.0], [2.0]]) == 3.0 and leaf_max(1.5) == 1.5
    assert leaf_max([[float("nan")]]) is None and leaf_max([]) == 0.0


def test_tp4_run_is_unified_to_tp1_before_the_figures(tmp_path):
    run = _synthetic_run(tmp_path / "r", world_size=4, kv_scale=2.0, seed=1)
    loaded = load_run(run.root)
    assert loaded.world_size == 4 and loaded.directory == run.measure
    assert loaded.figures.kv["K"] == {layer: 2.0 * (layer + 1) for layer in range(LAYERS)}
    assert loaded.figures.kv["V"] == {layer: 0.5 * (layer + 1) for layer in range(LAYERS)}
    assert loaded.figures.activations.high == {layer: 10.0 * (layer + 1) for layer in range(LAYERS)}
    assert loaded.figures.activations.top_module[3] == "model.layers.3.mlp.down_proj"
    assert all(0.1 <= loaded.figures.weights.low[layer] <= 0.2 for layer in range(LAYERS))
    assert loaded.label == "r (pile.jsonl, 16 samples, 64 tok/sample)"


@pytest.mark.parametrize("ep_size", [1, 2])
def test_experts_are_merged_as_the_run_sharded_them(tmp_path, ep_size):
    """TP-sharded experts (ep_size 1): every rank holds all experts, the TP1 view keeps their ids; expert
    parallel: rank r's local expert k is global expert r * E + k."""
    run = RunDir(tmp_path / "r")
    op = "model.layers.1.mlp.experts"
    for rank in range(2):
        nodes = {op: {"inputs": [[[1.0]]], "outputs": [[[1.0]]] + [[[0.5]]] * EXPERTS}}
        for k in range(EXPERTS):
            weight = {"params": {"weight": [[0.1 + 0.01 * k + 0.001 * rank]]}}
            nodes[f"{op}.w13_list.{k}"] = {"inputs": [[[1.0]]], **weight}
            nodes[f"{op}.w2_list.{k}"] = {"inputs": [[[0.5]]], **weight}
        name = StatsName(MEASURE_PREFIX, rank=rank, world_size=2)
        write_rank_file(RankFile(name=name, nodes=nodes), run.measure)
    write_meta(run.measure, RunMeta(model="tiny", tp_size=2, ep_size=ep_size))
    loaded = load_run(run.root)
    assert loaded.figures.num_nodes == 1 + 2 * EXPERTS * ep_size
    top = f"{op}.w13_list.{EXPERTS * ep_size - 1}"  # the largest weight: the last expert of the last rank
    assert loaded.figures.weights.top_module[1] in (top, top.replace("w13", "w2"))


def test_report_writes_pngs_and_a_summary_naming_never_hit_experts(tmp_path):
    base = _synthetic_run(tmp_path / "long", world_size=2, kv_scale=1.0, seed=2, never_hit=((2, 5), (3, 0)))
    other = _synthetic_run(tmp_path / "short", world_size=1, kv_scale=1.5, seed=3)
    mla = _synthetic_run(tmp_path / "mla", world_size=2, kv_scale=3.0, seed=4, mla=True)
    report = build_report(base.root, [other.root, mla.root], tmp_path / "out")
    names = sorted(p.name for p in report.plots)
    assert names == [
        "expert_coverage.png",
        "expert_coverage_1.png",
        "expert_coverage_2.png",
        "kv_cache_maxabs.png",
        "layer_ranges.png",
    ]
    for path in report.plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "K cache maxabs: max 4 at layer 3, min 1 over 4 layers" in summary
    assert "latent cache maxabs: max 12 at layer 3" in summary
    assert "expert coverage: 22/24 experts saw tokens" in summary
    assert "never hit: 2, e.g. model.layers.2.mlp.experts experts [5]" in summary
    assert "TP2 -> TP1" in summary and "TP1 -> TP1" in summary


def test_nan_nodes_are_reported_not_plotted(tmp_path):
    nodes = {
        "model.layers.0.mlp.down_proj": {"inputs": [[[float("nan")]]], "params": {"weight": [[1.0]]}},
        "model.layers.1.mlp.down_proj": {"inputs": [[[3.0]]], "params": {"weight": [[1.0]]}},
    }
    fig = figures(RankFile(name=StatsName("x"), nodes=nodes))
    assert fig.non_finite == ["model.layers.0.mlp.down_proj"] and fig.activations.high == {1: 3.0}


def test_cli_report_defaults_to_the_run_report_dir_and_errors_are_one_line(tmp_path):
    run = _synthetic_run(tmp_path / "r", world_size=2, kv_scale=1.0, seed=5)
    result = CliRunner().invoke(cli, ["report", str(run.root)])
    assert result.exit_code == 0, result.output
    assert (run.report / "kv_cache_maxabs.png").exists() and (run.report / "summary.txt").exists()
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "empty")])
    assert result.exit_code != 0 and "holds no INC measurement files" in str(result.exception)


@pytest.mark.fixtures
@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"real INC fixtures not found at {FIXTURES}")
def test_real_fixtures_deepseek_latent_and_llama_kv(tmp_path):
    report = build_report(
        FIXTURES / "inc-ds-r1-0528-g2-tp16", [FIXTURES / "inc-distill-llama-70b-g2-tp4"], tmp_path / "out"
    )
    r1, llama = report.runs
    assert r1.world_size == 16 and set(r1.figures.kv) == {"latent"} and len(r1.figures.kv["latent"]) == 61
    assert llama.world_size == 4 and set(llama.figures.kv) == {"K", "V"} and len(llama.figures.kv["K"]) == 80
    assert r1.figures.num_nodes == 30547  # 16 ranks x 16 experts placed as 256 per layer (EP unify)
    assert sorted(p.name for p in report.plots) == ["kv_cache_maxabs.png", "layer_ranges.png"]
    assert "no coverage.json" in report.summary
