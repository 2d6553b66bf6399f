"""Scale files beside the measurements are unified too: element-wise, experts concatenated in inputs[1:]."""

from ray_calib.inc import MODE_SCALE, MeasurementSet, RankFile, StatsName, write_rank_file
from tests.measurements.synthetic import PREFIX, write_set

OP = "model.layers.0.mlp.experts.moe_op"


def _scale_file(rank: int, weight: list[float], expert_scales: list[float]) -> RankFile:
    nodes = {
        "model.layers.0.self_attn.o_proj": {
            "inputs": [0.5 * (rank + 1)],
            "outputs": [0.25],
            "params": {"weight": weight},
        },
        OP: {"inputs": [1.0 + rank] + expert_scales, "outputs": [2.0]},
    }
    for kind in ("w13_list", "w2_list"):
        for expert in range(2):
            nodes[f"{OP}.{kind}.{expert}"] = {"inputs": [0.0], "params": {"weight": 0.1 * (expert + 1 + 2 * rank)}}
    return RankFile(name=StatsName(PREFIX, method="MAXABS_HW", rank=rank, world_size=2), nodes=nodes, mode=MODE_SCALE)


def test_scale_files_unified_elementwise(tmp_path, run_cli):
    write_set(tmp_path / "in", 2, experts=2, layers=1)
    write_rank_file(_scale_file(0, [1.0, 5.0], [0.1, 0.2]), tmp_path / "in")
    write_rank_file(_scale_file(1, [2.0, 3.0], [0.3, 0.4]), tmp_path / "in")
    result = run_cli("unify", "--to-tp", 1, "--in", tmp_path / "in", "--out", tmp_path / "out", "--expert-parallel")
    assert result.exit_code == 0, result.stderr
    assert "MAXABS_HW" in result.stdout
    scales = MeasurementSet.discover(tmp_path / "out", method="MAXABS_HW").read(0)
    assert scales.mode == MODE_SCALE
    # element-wise: Python's max([1.0, 5.0], [2.0, 3.0]) would give [2.0, 3.0]
    assert scales.nodes["model.layers.0.self_attn.o_proj"]["params"]["weight"] == [2.0, 5.0]
    assert scales.nodes["model.layers.0.self_attn.o_proj"]["inputs"] == [1.0]
    assert scales.nodes[OP]["inputs"] == [2.0, 0.1, 0.2, 0.3, 0.4]
    assert scales.nodes[f"{OP}.w13_list.3"] == {"inputs": [0.0], "params": {"weight": 0.1 * 4}}
    assert MeasurementSet.discover(tmp_path / "out").world_size == 1


def test_per_channel_weight_scales_are_not_resharded(tmp_path, run_cli):
    """A column-parallel rank's PCS vector holds only its rows: neither a max over ranks nor a TP1 copy is right."""
    write_set(tmp_path / "in", 2, layers=1)
    for rank in range(2):
        nodes = {
            "model.layers.0.self_attn.qkv_proj": {
                "inputs": [0.5],
                "outputs": ([0.5, 0.25],),
                "params": {"weight": {0: [1.0, 0.5], 1: [1.0] * 3}},
            },
            "model.layers.0.self_attn.o_proj": {"inputs": [0.5], "outputs": (0.25,), "params": {"weight": 0.5}},
        }
        write_rank_file(
            RankFile(
                name=StatsName(PREFIX, method="ACT_MAXABS_HW_WEIGHTS_PCS_MAXABS_POW2", rank=rank, world_size=2),
                nodes=nodes,
                mode=MODE_SCALE,
            ),
            tmp_path / "in",
        )
    result = run_cli("unify", "--to-tp", 1, "--in", tmp_path / "in", "--out", tmp_path / "out", "--expert-parallel")
    assert result.exit_code != 0 and "per-channel weight scales, which cannot be re-sharded" in result.stderr
    assert "run `ray-calib scales`" in result.stderr and not (tmp_path / "out").exists()
