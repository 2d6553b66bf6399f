"""`--inc-version` and the other QUANT_CONFIG choices: the rules that differ between INC releases."""

from __future__ import annotations

import pytest

from ray_calib.errors import ConfigError
from ray_calib.inc import MeasurementSet, RankFile, StatsName, write_rank_file
from ray_calib.inc.devices import DEVICES
from ray_calib.inc.methods import activation_scale, get_method, scale_from_maxabs
from ray_calib.inc.target import IncTarget, parse_version

G3 = DEVICES["gaudi3"]
HW = get_method("maxabs_hw")
OP = "model.layers.1.mlp.experts"


def _ranges(directory, experts: int = 4, intermediates: int | None = None) -> dict:
    intermediates = experts if intermediates is None else intermediates
    nodes = {
        "model.layers.0.self_attn.o_proj": {
            "inputs": [[[2.5]]],
            "outputs": [[[30.0]], [[55.0]]],
            "params": {"weight": [[0.4]]},
        },
        "model.layers.0.self_attn.attn.impl.batch2block_matmul": {"inputs": [[[1.0]], [[900.0]]], "outputs": [[[7.0]]]},
        OP: {"inputs": [[[3.0]]], "outputs": [[[1.0]]] + [[[0.5 * (e + 1)]] for e in range(intermediates)]},
    }
    for e in range(experts):
        for kind in ("w13_list", "w2_list"):
            nodes[f"{OP}.{kind}.{e}"] = {"inputs": [[[0.0]]], "params": {"weight": [[0.1]]}}
    write_rank_file(RankFile(name=StatsName("inc", rank=0, world_size=1), nodes=nodes), directory)
    return nodes


def _scales(run_cli, tmp_path, *args, experts: int = 4, intermediates: int | None = None):
    _ranges(tmp_path / "in", experts, intermediates)
    result = run_cli("scales", "--device", "gaudi3", "--in", tmp_path / "in", "--out", tmp_path / "out", *args)
    if result.exit_code:
        return result, None
    method = args[args.index("--scale-method") + 1].upper() if "--scale-method" in args else "MAXABS_HW"
    return result, MeasurementSet.discover(tmp_path / "out", method=method).read(0).nodes


def _a(value: float, backoff: float | None = None) -> float:
    return activation_scale(value, HW, G3, backoff=backoff)


@pytest.mark.parametrize(("version", "from_output"), [("3.8", False), ("3.8.1", True), (None, True)])
def test_b2b_matmul_takes_input_1_from_its_output_since_3_8_1(run_cli, tmp_path, version, from_output):
    _, nodes = _scales(run_cli, tmp_path, *(("--inc-version", version) if version else ()))
    b2b = nodes["model.layers.0.self_attn.attn.impl.batch2block_matmul"]
    assert b2b["inputs"] == [_a(1.0), _a(7.0 if from_output else 900.0)]
    assert b2b["outputs"] == (b2b["inputs"][0] * b2b["inputs"][1],)


@pytest.mark.parametrize(("version", "product"), [("3.3", True), ("3.4", False), ("3.10", False)])
def test_row_parallel_output_from_the_measured_pre_reduce_max_since_3_4(run_cli, tmp_path, version, product):
    _, nodes = _scales(run_cli, tmp_path, "--inc-version", version)
    o_proj = nodes["model.layers.0.self_attn.o_proj"]
    weight = scale_from_maxabs(0.4, HW.weight, G3)
    assert o_proj["outputs"] == ((_a(2.5) * weight,) if product else (_a(30.0),))


def test_output_backoff_is_a_3_4_option(run_cli, tmp_path):
    _, nodes = _scales(run_cli, tmp_path, "--inc-version", "3.4", "--output-backoff", "0.0625")
    assert nodes["model.layers.0.self_attn.o_proj"]["outputs"] == (_a(30.0, backoff=0.0625),)
    assert _a(30.0, backoff=0.0625) != _a(30.0)
    result, _ = _scales(run_cli, tmp_path / "new", "--output-backoff", "0.0625")
    assert (
        result.exit_code == 2
        and "INC 3.10 has no output_backoff" in result.stderr
        and "--inc-version 3.4" in result.stderr
    )


def test_allreduce_quantization_in_3_4_and_refused_where_inc_fails(run_cli, tmp_path):
    _, nodes = _scales(run_cli, tmp_path, "--inc-version", "3.4", "--allreduce-quantization")
    assert nodes["model.layers.0.self_attn.o_proj"]["outputs"] == (_a(30.0, backoff=1.0), _a(55.0, backoff=1.0))
    for version, message in (
        ("3.9", "fails on row_parallel_linear_allreduce_quantization"),
        ("3.3", "has no row_parallel_linear_allreduce_quantization"),
    ):
        result, _ = _scales(run_cli, tmp_path / version, "--inc-version", version, "--allreduce-quantization")
        assert result.exit_code == 2 and message in result.stderr


def test_moe_per_expert_scales_local_experts_since_3_5(run_cli, tmp_path):
    """Measure may record more intermediates than the rank's experts (1 + num_experts); 3.5+ uses the local
    count (the rank's w13_list children), 3.3/3.4 every measured one."""
    _, nodes = _scales(run_cli, tmp_path, experts=4, intermediates=6)
    assert nodes[OP]["inputs"] == [_a(3.0)] + [_a(0.5 * (e + 1)) for e in range(4)]
    assert nodes[OP]["outputs"] == (_a(1.0),)
    _, nodes = _scales(run_cli, tmp_path / "old", "--inc-version", "3.4", experts=4, intermediates=6)
    assert len(nodes[OP]["inputs"]) == 1 + 6
    result, _ = _scales(run_cli, tmp_path / "short", experts=4, intermediates=2)
    assert result.exit_code != 0 and "MoE op with 4 local experts" in result.stderr


def test_custom_backoffs_note_what_inc_3_5_does_with_them(run_cli, tmp_path):
    result, nodes = _scales(run_cli, tmp_path, "--input-backoff", "0.5")
    assert result.exit_code == 0
    assert "ignores scale_params backoffs" in result.stderr and "recalc_scales" in result.stderr
    assert nodes[OP]["outputs"] == (_a(1.0, backoff=0.5),)
    result, _ = _scales(run_cli, tmp_path / "v34", "--inc-version", "3.4", "--input-backoff", "0.5")
    assert result.exit_code == 0 and "ignores" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--scale-method", "act_maxabs_pcs_pow2_weight_maxabs_pts_pow2_hw"),
            "INC writes and reads no scale file for it",
        ),
        (("--inc-version", "three"), "is not MAJOR.MINOR"),
        (("--blocklist", "lm_head("), "--blocklist 'lm_head(' is not a valid regex"),
    ],
)
def test_refusals_are_one_line(run_cli, tmp_path, args, message):
    result, _ = _scales(run_cli, tmp_path, *args)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_e5m2_on_gaudi_and_refused_elsewhere(run_cli, tmp_path):
    result, nodes = _scales(run_cli, tmp_path, "--fp8-format", "e5m2")
    assert result.exit_code == 0 and "E5M2 (full scale 57344" in result.stdout
    assert nodes[OP]["outputs"] == (activation_scale(1.0, HW, G3.with_fp8_format("E5M2")),)
    _ranges(tmp_path / "cpu")
    result = run_cli(
        "scales", "--device", "cpu", "--fp8-format", "E5M2", "--in", tmp_path / "cpu", "--out", tmp_path / "o"
    )
    assert result.exit_code == 2 and "E5M2 is for INC on Gaudi" in result.stderr


def test_fixed_methods_write_their_value_everywhere_but_matmul_products(run_cli, tmp_path):
    _, nodes = _scales(run_cli, tmp_path, "--scale-method", "hw_aligned_single_scale")
    assert nodes["model.layers.0.self_attn.o_proj"] == {
        "inputs": [128.0],
        "outputs": (128.0,),
        "params": {"weight": 128.0},
    }
    assert nodes["model.layers.0.self_attn.attn.impl.batch2block_matmul"]["outputs"] == (128.0 * 128.0,)


def test_versions():
    assert parse_version("3.8.1") == (3, 8, 1) and parse_version("v3.4") == (3, 4, 0)
    assert IncTarget().label == "3.10" and IncTarget(parse_version("3.8.1")).label == "3.8.1"
    with pytest.raises(ConfigError, match="has no fp8_quant"):
        parse_version("2.6")
