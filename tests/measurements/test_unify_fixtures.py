"""Unify on the real Gaudi measurement files (docs/design.md §10): the numbers docs/design.md §4 gives."""

import json

import pytest

from ray_calib.inc import MeasurementSet, npz
from ray_calib.measurements import unify_ranks
from tests.conftest import DS_R1_TP16, LLAMA70B_TP4, fixture_dir

pytestmark = pytest.mark.fixtures
MOE = "model.layers.3.mlp.experts.moe_op"


@pytest.fixture(scope="module")
def ds_ranks():
    return MeasurementSet.discover(fixture_dir(DS_R1_TP16)).read_all()


def test_discovers_the_run(ds_ranks):
    run = MeasurementSet.discover(DS_R1_TP16)
    assert (run.prefix, run.world_size, run.method) == ("inc_measure_output", 16, None)
    assert [n.rank for n in run.names] == list(range(16))


def test_ds_r1_16_to_8(ds_ranks, tmp_path, run_cli):
    result = run_cli("unify", "--to-tp", 8, "--in", DS_R1_TP16, "--out", tmp_path, "--expert-parallel")
    assert result.exit_code == 0, result.stderr
    assert "expert-parallel" in result.stdout
    unified = MeasurementSet.discover(tmp_path).read_all()
    assert len(unified) == 8
    assert {len(r.nodes) for r in ds_ranks} == {2707}
    assert {len(r.nodes) for r in unified} == {4563}
    assert unified[1].nodes[f"{MOE}.w13_list.20"] == ds_ranks[3].nodes[f"{MOE}.w13_list.4"]
    assert unified[1].nodes[f"{MOE}.w2_list.5"] == ds_ranks[2].nodes[f"{MOE}.w2_list.5"]
    assert len(ds_ranks[0].nodes[MOE]["outputs"]) == 17
    assert len(unified[1].nodes[MOE]["outputs"]) == 33
    # outputs[0] is the max over the group, outputs[1:] the two members' per-expert amax in order
    assert unified[1].nodes[MOE]["outputs"][0] == max(
        ds_ranks[2].nodes[MOE]["outputs"][0], ds_ranks[3].nodes[MOE]["outputs"][0]
    )
    assert unified[1].nodes[MOE]["outputs"][1:] == (
        ds_ranks[2].nodes[MOE]["outputs"][1:] + ds_ranks[3].nodes[MOE]["outputs"][1:]
    )
    raw = json.loads((tmp_path / "inc_measure_output_hooks_maxabs_5_8.json").read_text())
    assert raw["LocalRank"] == 5 and raw["Mode"] == "DynamicRange"
    # the mod_list is written (the reference forgets it) with renumbered experts
    assert f"{MOE}.w13_list.31" in unified[0].mod_list


def test_npz_equals_json_after_unify(tmp_path, run_cli):
    assert (
        run_cli(
            "unify", "--to-tp", 8, "--in", fixture_dir(DS_R1_TP16), "--out", tmp_path, "--expert-parallel"
        ).exit_code
        == 0
    )
    for rank in (0, 7):
        stem = tmp_path / f"inc_measure_output_hooks_maxabs_{rank}_8"
        assert npz.load(stem.with_suffix(".npz")) == json.loads(stem.with_suffix(".json").read_text())


def test_chained_unify_equals_direct(ds_ranks):
    direct = unify_ranks(ds_ranks, 1)[0]
    chained = ds_ranks
    for size in (8, 4, 2, 1):
        chained = unify_ranks(chained, size)
    assert chained[0].nodes == direct.nodes
    assert list(chained[0].nodes) == list(direct.nodes)
    assert chained[0].mod_list == direct.mod_list
    assert len(direct.nodes[MOE]["outputs"]) == 1 + 16 * 16


def test_chained_unify_through_files(tmp_path, run_cli):
    """Output of unify is valid input of unify (JSON, NPZ and mod_list all written)."""
    previous = fixture_dir(DS_R1_TP16)
    for size in (4, 1):
        out = tmp_path / f"tp{size}"
        assert run_cli("unify", "--to-tp", size, "--in", previous, "--out", out, "--expert-parallel").exit_code == 0
        previous = out
    direct = unify_ranks(MeasurementSet.discover(DS_R1_TP16).read_all(), 1)[0]
    assert MeasurementSet.discover(previous).read(0).nodes == direct.nodes


def test_llama_70b_tp4_to_2_and_1():
    ranks = MeasurementSet.discover(fixture_dir(LLAMA70B_TP4)).read_all()
    two, one = unify_ranks(ranks, 2), unify_ranks(ranks, 1)
    assert [r.name.stem for r in two] == ["inc_output_hooks_maxabs_0_2", "inc_output_hooks_maxabs_1_2"]
    assert {len(r.nodes) for r in two + one} == {len(ranks[0].nodes)} == {881}
    o_proj = "model.layers.0.self_attn.o_proj"
    for field in ("inputs", "outputs"):
        for i in range(len(ranks[0].nodes[o_proj][field])):
            expected = max(r.nodes[o_proj][field][i][0][0] for r in ranks)
            assert one[0].nodes[o_proj][field][i] == [[expected]]
    assert unify_ranks(two, 1)[0].nodes == one[0].nodes


def test_expand_inverts_unify_for_experts(ds_ranks, tmp_path, run_cli):
    one = tmp_path / "tp1"
    assert run_cli("unify", "--to-tp", 1, "--in", DS_R1_TP16, "--out", one, "--expert-parallel").exit_code == 0
    result = run_cli("expand", "--to-ranks", 16, "--in", one, "--out", tmp_path / "ep16")
    assert result.exit_code == 0, result.stderr
    expanded = MeasurementSet.discover(tmp_path / "ep16").read_all()
    assert len(expanded) == 16
    for rank in (0, 9):
        assert expanded[rank].nodes[MOE]["outputs"][1:] == ds_ranks[rank].nodes[MOE]["outputs"][1:]
        assert expanded[rank].nodes[f"{MOE}.w13_list.4"] == ds_ranks[rank].nodes[f"{MOE}.w13_list.4"]
        assert len(expanded[rank].nodes) == len(ds_ranks[rank].nodes)
    again = unify_ranks(expanded, 1)[0]
    assert again.nodes == MeasurementSet.discover(one).read(0).nodes


def test_inspect_reports_the_run(run_cli):
    result = run_cli("inspect", fixture_dir(DS_R1_TP16))
    assert result.exit_code == 0, result.stderr
    assert "world size 16" in result.stdout and "nodes per rank 2707" in result.stdout
    assert "routed experts per rank 16" in result.stdout
    assert "model.layers.*.mlp.experts.moe_op.w13_list.*" in result.stdout
    assert "0 NaN, 0 inf" in result.stdout
