"""`infer` on Gaudi takes its defaults from the run: the measured model, the unified TP, the one-node
QUANTIZE config (written when absent), the KV cache dtype that config implies, EP as measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_calib.errors import ConfigError, MeasurementError, ModelError
from ray_calib.inc import RunMeta, write_meta
from ray_calib.inc.quant_config import read_config
from ray_calib.infer import gaudi, runner
from ray_calib.rundir import RunDir
from tests.measure.test_gaudi_dry_run import DEEPSEEK_R1


def model(tmp_path: Path, fp8: bool) -> Path:
    path = tmp_path / ("DeepSeek-R1" if fp8 else "DeepSeek-R1-bf16")
    path.mkdir()
    config = {k: v for k, v in DEEPSEEK_R1.items() if fp8 or k != "quantization_config"}
    (path / "config.json").write_text(json.dumps(config))
    return path


def run_with(tmp_path: Path, source: Path, *, fp8_kv: bool, ep: int = 8) -> tuple[RunDir, RunMeta]:
    run = RunDir.resolve(tmp_path / "run")
    meta = RunMeta(device_type="gaudi2", model=str(source), tp_size=8, ep_size=ep, fp8_kv=fp8_kv, unified_from=16)
    run.unified(8).mkdir(parents=True)
    write_meta(run.unified(8), meta)
    return run, meta


def test_defaults_come_from_the_run(tmp_path):
    source = model(tmp_path, fp8=True)
    run, meta = run_with(tmp_path, source, fp8_kv=True)
    plan = gaudi.resolve(run, meta, model=None, tp=None, quant_config=None, fp8_kv=None)
    assert (plan.model, plan.tp_size, plan.fp8_kv, plan.expert_parallel, plan.generated) == (
        source,
        8,
        True,
        True,
        True,
    )
    written = read_config(plan.quant_config)
    assert plan.quant_config == run.configs / "inc_quant_with_fp8kv_one_node_config.json"
    assert written["mode"] == "QUANTIZE" and written["dump_stats_path"] == str(run.unified(8) / "inc_measure_output")
    assert r"mlp\.gate\b" in written["blocklist"]["names"] and "matmul_qk" in written["blocklist"]["names"]
    engine = runner.engine_config(
        runner.InferConfig(
            model=plan.model,
            tp_size=8,
            device="hpu",
            fp8_kv=plan.fp8_kv,
            quant_config=plan.quant_config,
            expert_parallel=plan.expert_parallel,
        )
    )
    assert engine.kv_cache_dtype == "fp8_inc" and engine.quantization is None  # FP8 checkpoint: QUANT_CONFIG only
    assert not engine.enforce_eager and engine.trust_remote_code and engine.enable_expert_parallel
    env = engine.extra_env
    assert env["QUANT_CONFIG"] == str(plan.quant_config) and env["PT_HPU_WEIGHT_SHARING"] == "0"
    assert env["VLLM_ENGINE_READY_TIMEOUT_S"] == "1800" and "VLLM_SKIP_WARMUP" not in env  # serving warms up
    # the second call finds the config written and uses it as it is
    assert not gaudi.resolve(run, meta, model=None, tp=None, quant_config=None, fp8_kv=None).generated


def test_bf16_weights_get_quantization_inc_and_bf16_kv(tmp_path):
    source = model(tmp_path, fp8=False)
    run, meta = run_with(tmp_path, source, fp8_kv=False, ep=1)
    plan = gaudi.resolve(run, meta, model=None, tp=None, quant_config=None, fp8_kv=None)
    assert not plan.fp8_kv and not plan.expert_parallel
    assert read_config(plan.quant_config)["blocklist"]["types"] == ["KVCache", "VLLMKVCache"]
    engine = runner.engine_config(
        runner.InferConfig(model=source, tp_size=8, device="hpu", fp8_kv=False, quant_config=plan.quant_config)
    )
    assert engine.quantization == "inc" and engine.kv_cache_dtype == "auto"
    args = runner.serve_args(
        runner.InferConfig(model=source, tp_size=8, device="hpu", quant_config=plan.quant_config),
        host="0.0.0.0",
        port=8000,
    )
    assert "--quantization" in args and "--enforce-eager" not in args and "--dtype" in args


def test_kv_dtype_conflicts_are_refused(tmp_path):
    source = model(tmp_path, fp8=True)
    run, meta = run_with(tmp_path, source, fp8_kv=False)
    bf16_kv = gaudi.resolve(run, meta, model=None, tp=None, quant_config=None, fp8_kv=None).quant_config
    with pytest.raises(ConfigError, match="--fp8-kv, but this QUANT_CONFIG blocks"):
        gaudi.resolve(run, meta, model=None, tp=None, quant_config=bf16_kv, fp8_kv=True)
    with pytest.raises(ConfigError, match="recorded no K/V ranges"):  # the measurements cannot back FP8 KV
        gaudi.resolve(run, meta, model=None, tp=None, quant_config=None, fp8_kv=True)


def test_missing_pieces_name_the_fix(tmp_path):
    source = model(tmp_path, fp8=True)
    run, meta = run_with(tmp_path, source, fp8_kv=True)
    with pytest.raises(MeasurementError, match="no measurements at TP 4.*unify --to-tp 4"):
        gaudi.resolve(run, meta, model=None, tp=4, quant_config=None, fp8_kv=None)
    with pytest.raises(ModelError, match="names the measured model"):
        gaudi.resolve(run, None, model=None, tp=None, quant_config=None, fp8_kv=None)
    plan = gaudi.resolve(run, meta, model=None, tp=None, quant_config=None, fp8_kv=None)
    config = json.loads(plan.quant_config.read_text())
    plan.quant_config.write_text(json.dumps({**config, "dump_stats_path": "/elsewhere/inc_measure_output"}))
    with pytest.raises(ConfigError, match="not the TP 8 measurements"):
        gaudi.resolve(run, meta, model=None, tp=None, quant_config=None, fp8_kv=None)


def test_infer_one_node_on_gaudi_runs_without_paths(tmp_path, run_cli):
    """The README's `ray-calib infer` (dry run): no --model, no --quant-config needed."""
    source = model(tmp_path, fp8=True)
    run, _ = run_with(tmp_path, source, fp8_kv=True)
    result = run_cli("infer", "--device", "gaudi2", "--run-dir", run.root, "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert f"model='{source}'" in result.stdout and "kv_cache_dtype='fp8_inc'" in result.stdout
    mismatch = run_cli("infer", "--device", "gaudi3", "--run-dir", run.root, "--dry-run")
    assert mismatch.exit_code == 1 and "measured on gaudi2 but this node is gaudi3" in mismatch.stderr


def test_serving_deepseek_bf16_on_one_gaudi2_node_is_refused(tmp_path):
    """vllm-gaudi stages MoE experts on the cards in BF16 before INC converts them: 168 GB per 96 GB card."""
    from ray_calib.errors import EngineError

    source = model(tmp_path, fp8=False)
    config = runner.InferConfig(model=source, tp_size=8, device="hpu", quant_config=tmp_path / "q.json")
    with pytest.raises(EngineError, match=r"does not fit at TP 8.*157.5 GiB per card.*the FP8 checkpoint"):
        gaudi.check_serve_fit(config, target_bytes=96 << 30)
    fp8 = runner.InferConfig(model=model(tmp_path, fp8=True), tp_size=8, device="hpu", quant_config=tmp_path / "q.json")
    route, fit = gaudi.serve_fit(fp8, 96 << 30)
    assert route.name == "fp8-checkpoint" and fit.card_need < fit.card_budget


def test_devices_conf_quant_config_is_the_default(tmp_path, run_cli):
    """INC_QUANT_CONFIG_FILENAME of the reference flow's devices.conf is what infer loads, across the cluster."""
    source = model(tmp_path, fp8=True)
    run, _ = run_with(tmp_path, source, fp8_kv=True)
    mine = tmp_path / "my_quant.json"
    template = Path(__file__).parents[2] / "configs" / "inc_quant_with_fp8kv_one_node_config.json"
    mine.write_text(
        json.dumps({**json.loads(template.read_text()), "dump_stats_path": str(run.unified(8) / "inc_measure_output")})
    )
    conf = tmp_path / "devices.conf"
    conf.write_text(
        f"HEAD_NODE_IP=10.0.0.1\nWORKER_NODE_IP=10.0.0.2\nDEVICE_KIND=hpu\nDEVICES_PER_NODE=4\n"
        f"INC_QUANT_CONFIG_FILENAME={mine}\n"
    )
    result = run_cli("infer", "--conf", conf, "--device", "gaudi2", "--run-dir", run.root, "--dry-run")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert f"QUANT_CONFIG={mine}" in out and "distributed_executor_backend='ray'" in out
    assert "head 10.0.0.1 (driver): ranks 0-3 of 8" in out and "worker1 10.0.0.2: ranks 4-7 of 8" in out
    assert "must be at the same paths on every node" in out


@pytest.mark.parametrize("via", ["--quant-config", "devices.conf"])
def test_a_quant_config_reading_other_measurements_is_refused(tmp_path, run_cli, via):
    """The seeds' template names ./scripts/nc_workspace_measure_kvcache/inc_measure_output: old hand-run files
    (or none) that INC used to load silently instead of the run's measurements."""
    source = model(tmp_path, fp8=True)
    run, _ = run_with(tmp_path, source, fp8_kv=True)
    template = Path(__file__).parents[2] / "configs" / "inc_quant_with_fp8kv_one_node_config.json"
    args: tuple = ("--quant-config", template)
    if via == "devices.conf":
        conf = tmp_path / "devices.conf"
        conf.write_text(f"HEAD_NODE_IP=10.0.0.1\nDEVICE_KIND=hpu\nINC_QUANT_CONFIG_FILENAME={template}\n")
        args = ("--conf", conf)
    result = run_cli("infer", *args, "--device", "gaudi2", "--run-dir", run.root, "--dry-run")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    dump = json.loads(template.read_text())["dump_stats_path"]
    assert dump in result.stderr and str(run.unified(8)) in result.stderr
    assert ("INC_QUANT_CONFIG_FILENAME" if via == "devices.conf" else "--quant-config") in result.stderr
