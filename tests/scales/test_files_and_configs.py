"""INC scale files from real and synthetic ranges; QUANT_CONFIG templates, validation and stale scales."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ray_calib.errors import ConfigError
from ray_calib.inc import MODE_SCALE, MeasurementSet
from ray_calib.inc.devices import DEVICES
from ray_calib.inc.methods import get_method
from ray_calib.inc.quant_config import MLA_FP8_KV_BLOCK, is_moe, read_config, stale_scale_files, template_set, validate
from ray_calib.inc.target import IncTarget, parse_version
from ray_calib.scales.files import write_scale_files
from tests.conftest import LLAMA70B_TP4, fixture_dir
from tests.measurements.synthetic import write_set

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.fixtures
def test_gaudi2_scale_files_from_real_llama70b_ranges(tmp_path):
    run = write_scale_files(fixture_dir(LLAMA70B_TP4), tmp_path, get_method("maxabs_hw"), DEVICES["gaudi2"])
    assert run.ranks == 4
    scales = MeasurementSet.discover(tmp_path, method="MAXABS_HW")
    assert [n.stem for n in scales.names][1] == "inc_output_hooks_maxabs_MAXABS_HW_1_4"
    rank0 = scales.read(0)
    assert rank0.mode == MODE_SCALE
    o_proj = rank0.nodes["model.layers.0.self_attn.o_proj"]  # the Gaudi2 worked example, from the real file
    assert o_proj["inputs"] == [0.00390625] and o_proj["params"]["weight"] == 0.0625
    # INC >= 3.4: a RowParallelLinear's output scale comes from its measured pre-all-reduce max (0.1738)
    assert o_proj["outputs"] == (0.00390625,)
    assert run.target.row_parallel_op
    qk = rank0.nodes["model.layers.0.self_attn.attn.impl.matmul_qk"]
    assert qk["outputs"] == (qk["inputs"][0] * qk["inputs"][1],) and qk["params"] == {}
    old = write_scale_files(
        LLAMA70B_TP4,
        tmp_path / "v33",
        get_method("maxabs_hw"),
        DEVICES["gaudi2"],
        target=IncTarget(parse_version("3.3")),
    )
    assert old.ranks == 4
    o_proj = (
        MeasurementSet.discover(tmp_path / "v33", method="MAXABS_HW").read(0).nodes["model.layers.0.self_attn.o_proj"]
    )
    assert o_proj["outputs"] == (0.00390625 * 0.0625,)  # INC <= 3.3: RowParallelLinear is a plain linear


def test_moe_op_scales_go_to_inputs(tmp_path):
    write_set(tmp_path / "in", 2, experts=4)
    write_scale_files(tmp_path / "in", tmp_path / "out", get_method("maxabs_pow2"), DEVICES["gaudi3"])
    ranges = MeasurementSet.discover(tmp_path / "in").read(0)
    scaled = MeasurementSet.discover(tmp_path / "out", method="MAXABS_POW2").read(0)
    op = "model.layers.0.mlp.experts.moe_op"
    assert len(scaled.nodes[op]["inputs"]) == 1 + 4 and len(scaled.nodes[op]["outputs"]) == 1
    expected = [get_method("maxabs_pow2").activation.backoff]
    amax = ranges.nodes[op]["outputs"][2][0][0]
    assert scaled.nodes[op]["inputs"][2] >= amax / (448 * expected[0])


@pytest.mark.parametrize("method", ["act_maxabs_pow2_weights_pcs_maxabs_pow2", "maxabs_pow2_opt_weight"])
def test_pcs_and_opt_without_weights_are_refused(tmp_path, run_cli, method):
    """INC computes these from the weight tensor itself: a measured max is not enough."""
    write_set(tmp_path / "in", 1)
    result = run_cli(
        "scales", "--scale-method", method, "--device", "gaudi3", "--in", tmp_path / "in", "--out", tmp_path / "o"
    )
    assert result.exit_code != 0 and "--weights MODEL_DIR" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_shipped_templates_are_the_generated_ones():
    generated = template_set("./calib-run/measure", "./calib-run/unified-tp8", moe=True, mla=True)
    shipped = {p.name: json.loads(p.read_text()) for p in (REPO / "configs").glob("*.json")}
    assert shipped == generated and len(shipped) == 6
    measure = shipped["inc_measure_config.json"]
    assert measure["blocklist"] == {"types": ["KVCache", "VLLMKVCache"], "names": ["lm_head", r"mlp\.gate\b"]}
    assert shipped["inc_measure_with_fp8kv_config.json"]["blocklist"]["types"] == []
    # the router stays BF16 in the one-node configs too (an unmeasured patched router fails at load)
    assert shipped["inc_quant_one_node_config.json"]["blocklist"]["names"] == ["lm_head", r"mlp\.gate\b"]
    # FP8 KV with MLA: only the latent cache is FP8; attention matmuls and unused cache variants stay BF16
    assert shipped["inc_quant_with_fp8kv_one_node_config.json"]["blocklist"]["names"] == [
        "lm_head",
        r"mlp\.gate\b",
        "latent_cache_k_nodeq",
        "latent_cache_v_nodeq",
        "latent_cache_v",
        "matmul_qk",
        "matmul_av",
        "block2batch_matmul",
    ]


def test_kv_cache_dtype_follows_the_quantize_config():
    from ray_calib.inc.quant_config import quantizes_kv_cache

    configs = template_set("/m", "/u", moe=True)
    assert quantizes_kv_cache(configs["inc_quant_with_fp8kv_one_node_config.json"])
    assert not quantizes_kv_cache(configs["inc_quant_one_node_config.json"])
    assert template_set("/m", "/u", moe=False)["inc_quant_one_node_config.json"]["blocklist"]["names"] == ["lm_head"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scale_methd": "maxabs_hw"}, "unknown key 'scale_methd'.*did you mean 'scale_method'"),
        ({"mode": "CALIBRATE"}, "'mode' is 'CALIBRATE'"),
        ({"observer": "minmax"}, "'observer' is 'minmax'"),
        ({"scale_method": "maxabs_fast"}, "'scale_method' is 'maxabs_fast'"),
        ({"scale_method": "act_maxabs_pcs_pow2_weight_maxabs_pts_pow2_hw"}, "needs 'dynamic_quantization': true"),
        ({"blocklist": {"types": [], "names": ["mlp\\.gate("]}}, r"'blocklist.names\[0\]'.*not a valid regex"),
        ({"blocklist": {"names": [], "kinds": []}}, "'blocklist' must be an object"),
        ({"whitelist": {"types": [], "names": []}}, "both 'whitelist' and 'allowlist'"),
        ({"scale_params": {"input_backof": 0.25}}, "unknown key 'scale_params.input_backof'"),
        ({"dump_stats_path": ""}, "'dump_stats_path' is missing"),
        (
            {"scale_method": {"default": {"weight": {"rounding_method": "cubic"}}}},
            "matches none of INC's scale methods",
        ),
    ],
)
def test_config_errors_name_the_key(change, message):
    config = {**template_set("/m", "/u", moe=True)["inc_quant_config.json"], **change}
    with pytest.raises(ConfigError, match=message):
        validate(config, "q.json")


def test_inc_34_output_backoff_and_a_dict_form_scale_method_are_accepted():
    base = template_set("/m", "/u", moe=True)["inc_quant_config.json"]
    validate({**base, "scale_params": {"output_backoff": 0.5}}, "q.json")
    dict_form = {
        "default": {
            "weight": {"rounding_method": "pow2", "backoff": 0.5},
            "activation": {"rounding_method": "pow2", "backoff": 0.75},
        }
    }
    validate({**base, "scale_method": dict_form}, "q.json")  # maxabs_pow2 with another activation backoff


def test_legacy_keys_are_mapped(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(
        json.dumps(
            {
                "mode": "QUANTIZE",
                "blacklist": {"names": ["lm_head"]},
                "whitelist": {"types": []},
                "dump_stats_path": "/x/inc",
            }
        )
    )
    config = read_config(path)
    assert config["blocklist"] == {"names": ["lm_head"]} and "blacklist" not in config and "allowlist" in config


def test_stale_scale_files_and_cli_warning(tmp_path, run_cli):
    measure = tmp_path / "run" / "measure"
    write_set(measure, 2)
    stale = measure / "inc_measure_output_hooks_maxabs_MAXABS_HW_0_2.npz"
    stale.write_bytes(b"old")
    old = os.stat(measure / "inc_measure_output_hooks_maxabs_0_2.json").st_mtime - 100
    os.utime(stale, (old, old))
    assert stale_scale_files(measure) == [stale]
    result = run_cli(
        "quant-config", "write", "--model", "deepseek-ai/DeepSeek-R1", "--run-dir", tmp_path / "run", "--fp8-kv"
    )
    assert result.exit_code == 0, result.stderr
    assert "stale scale file" in result.stderr and "--clean-stale-scales" in result.stderr
    written = json.loads((tmp_path / "run/configs/inc_quant_with_fp8kv_config.json").read_text())
    assert written["dump_stats_path"] == str(measure / "inc_measure_output")
    assert written["blocklist"]["names"] == ["lm_head", r"mlp\.gate\b", *MLA_FP8_KV_BLOCK]  # DeepSeek: MLA
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mode": "QUANTIZE", "dump_stats_path": "/x", "scale_mehtod": "maxabs_hw"}))
    result = run_cli("quant-config", "check", bad)
    assert result.exit_code == 2 and "unknown key 'scale_mehtod'" in result.stderr and "Traceback" not in result.stderr


def test_scales_cli_writes_scale_files(tmp_path, run_cli):
    write_set(tmp_path / "in", 2)
    result = run_cli(
        "scales",
        "--scale-method",
        "maxabs_hw",
        "--device",
        "gaudi2",
        "--in",
        tmp_path / "in",
        "--out",
        tmp_path / "out",
    )
    assert result.exit_code == 0, result.stderr
    assert "wrote 2 MAXABS_HW scale file(s)" in result.stdout
    result = run_cli(
        "scales", "--scale-method", "maxabs_hw", "--device", "cpu", "--in", tmp_path / "in", "--out", tmp_path / "o2"
    )
    assert result.exit_code == 2 and "Gaudi HW scales" in result.stderr


def test_moe_is_decided_by_the_expert_count_like_measure_does():
    assert is_moe({"model_type": "glm4_moe", "n_routed_experts": 128}, "models/GLM-4.5-Air")
    assert is_moe({"model_type": "mixtral", "num_local_experts": 8})
    assert not is_moe({"model_type": "llama"}, "/data/not-moe-llama")  # a path never overrides config.json
    assert is_moe({}, "deepseek-ai/DeepSeek-R1")  # no local config: the hub id decides
