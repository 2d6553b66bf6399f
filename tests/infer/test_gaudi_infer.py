"""`infer` on Gaudi takes its defaults from the run: the measured model, the unified TP, the one-node
QUANTIZE config (written when absent), the KV cache dtype that config implies, EP as measured."""

from __future__ import annotations

import json
from dataclasses import replace
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
    (run.unified(8) / "inc_measure_output_hooks_maxabs_0_8.json").write_text("{}")  # given configs need their files
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
    # the server spreads its ranks the same way: vLLM's Ray executor on the cluster `up` started
    served = run_cli("infer", "--serve", "--conf", conf, "--device", "gaudi2", "--run-dir", run.root, "--dry-run")
    assert served.exit_code == 0, served.stderr
    assert "serve" in served.stdout and "--distributed-executor-backend ray" in served.stdout
    alone = run_cli("infer", "--serve", "--device", "gaudi2", "--run-dir", run.root, "--dry-run")
    assert "--distributed-executor-backend" not in alone.stdout


def test_dry_run_serve_of_deepseek_r1_is_bounded_and_counts_kv_cache_and_graph_reserve(tmp_path, run_cli):
    """README's `infer --serve` for R1 on Gaudi2: 16k context, 64 sequences, and a fit that counts the KV cache
    of one full sequence and the HPU-graph reserve on top of the weights; a start-up wait of its own."""
    source = model(tmp_path, fp8=True)
    run, _ = run_with(tmp_path, source, fp8_kv=True)
    result = run_cli("infer", "--serve", "--dry-run", "--device", "gaudi2", "--run-dir", run.root)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    for arg in ("--max-model-len 16384", "--max-num-seqs 64", "--max-num-batched-tokens 16384"):
        assert arg in out, arg
    assert "--gpu-memory-utilization 0.85" in out and "VLLM_GRAPH_RESERVED_MEM=0.1" in out
    assert "the model allows 163840" in out and "163840 " not in out.split("command")[1]
    # 96 GiB card: 78.2 GiB of FP8 weights + 1 GiB; the remaining 16.8 GiB x 0.85 -> 1.4 graph + 12.8 KV
    assert "weights 78.2 GiB + activations 1 GiB" in out and "graph reserve 1.4 GiB" in out
    assert "KV cache 12.8 GiB" in out
    # MLA latent per token per card: 61 layers x (512 + 64) x 1 byte (FP8)
    assert "34.3 KiB per token per card (fp8_inc)" in out and "room for 23 such sequences" in out
    ready = next(line for line in out.splitlines() if "VLLM_ENGINE_READY_TIMEOUT_S=" in line).split("=")[1]
    assert int(ready) > 3000 and "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS=1800" in out  # start-up apart from a step
    assert "start-up wait" in out and "warm-up" in out and "VLLM_SKIP_WARMUP" not in out  # warms up as upstream


def test_full_context_with_a_bf16_cache_does_not_fit_and_says_why(tmp_path):
    """R1's whole 163840 tokens in a BF16 latent cache need 10.7 GiB per card; at that length upstream lowers
    gpu_memory_utilization to 0.65, which leaves 9.8 GiB after the graph reserve: refused before vLLM starts."""
    from ray_calib.errors import EngineError

    config = runner.InferConfig(
        model=model(tmp_path, fp8=True), tp_size=8, device="hpu", quant_config=tmp_path / "q.json", fp8_kv=False
    )

    def card_problems(**changes) -> list[str]:  # this CI host has no 626 GiB of RAM: only the card is checked
        _, fit = gaudi.serve_fit(replace(config, **changes), 96 << 30)
        return [p for p in fit.problems() if "host RAM" not in p]

    (problem,) = card_problems(max_model_len=163840)
    assert "KV cache of one 163840-token sequence needs 10.7 GiB per card, 9.8 GiB are left" in problem
    assert card_problems(max_model_len=16384) == []  # the default fits
    assert card_problems(max_model_len=163840, fp8_kv=True) == []  # an FP8 latent cache holds one (5.4 GiB)
    with pytest.raises(EngineError, match="KV cache of one 163840-token sequence"):
        gaudi.check_serve_fit(replace(config, max_model_len=163840), target_bytes=96 << 30)


def test_serving_limits_and_start_up_wait():
    from ray_calib.engine import gaudi as engine

    assert engine.serve_context(163840, 1056, None)[0] == 16384
    assert engine.serve_context(163840, 20000, None) == (
        20000,
        "the calibration length 20000; the model allows 163840, --max-model-len for more",
    )
    assert engine.serve_context(4096, 1056, None) == (4096, "the model's context 4096")
    assert engine.serve_context(163840, 1056, 163840) == (163840, "--max-model-len")
    assert engine.serve_memory_utilization(16384) == 0.85 and engine.serve_memory_utilization(32768) == 0.65
    # 688 GB read at 1 GB/s and moved to the cards, the fixed start and the warm-up
    assert engine.startup_wait_s(688 * 10**9, 1e9, warmup=True) == 600 + 1376 + 1200
    assert engine.startup_wait_s(688 * 10**9, 1e9, warmup=False) == 600 + 1376
    llama = {"num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8, "hidden_size": 16384}
    assert engine.kv_token_bytes(llama, 8, fp8=False) == 126 * 2 * 1 * 128 * 2  # one KV head per rank at TP 8
    assert engine.kv_token_bytes(llama, 16, fp8=True) == 126 * 2 * 1 * 128  # at least one head per rank


def test_skip_warmup_and_an_explicit_start_up_wait_reach_the_server(tmp_path, run_cli):
    source = model(tmp_path, fp8=True)
    run, _ = run_with(tmp_path, source, fp8_kv=True)
    result = run_cli(
        "infer", "--serve", "--dry-run", "--device", "gaudi2", "--run-dir", run.root,
        "--skip-warmup", "--startup-timeout", "5000", "--max-model-len", "32768", "--max-num-seqs", "8",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "VLLM_SKIP_WARMUP=true" in out and "VLLM_ENGINE_READY_TIMEOUT_S=5000" in out
    assert "--max-model-len 32768 --max-num-seqs 8" in out and "--gpu-memory-utilization 0.65" in out


def test_a_compressed_tensors_checkpoint_is_served_by_vllm_gaudi_without_inc(tmp_path, run_cli):
    """`quantize --format compressed-tensors` output on Gaudi: no QUANT_CONFIG, no --quantization (the checkpoint
    names compressed-tensors), fp8_inc KV when it carries k/v scales, and the same bounded context and fit."""
    source = model(tmp_path, fp8=False)
    run, _ = run_with(tmp_path, source, fp8_kv=True)
    checkpoint = tmp_path / "run" / "fp8-gaudi2"
    checkpoint.mkdir()
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "kv_cache_scheme": {"type": "float"}}
    (checkpoint / "config.json").write_text(json.dumps(config))
    result = run_cli(
        "infer", "--serve", "--dry-run", "--device", "gaudi2", "--run-dir", run.root, "--model", checkpoint
    )
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "QUANT_CONFIG" not in out and "--quantization" not in out and "--kv-cache-dtype fp8_inc" in out
    assert "--max-model-len 16384" in out and "KV cache: 34.3 KiB per token per card (fp8_inc)" in out
    assert "--tensor-parallel-size 8" in out and "--enable-expert-parallel" in out
    assert not (run.configs).exists()  # nothing of INC's is written for it


def test_a_given_quant_config_must_name_this_tps_measurements_absolutely(tmp_path):
    """The reference flow's QUANT_CONFIG has a relative dump_stats_path (./scripts/nc_workspace_.../): refused, as
    is one whose directory holds no files for the serving TP (a real run only: a dry run shows the plan)."""
    source = model(tmp_path, fp8=True)
    run, meta = run_with(tmp_path, source, fp8_kv=True)
    template = json.loads(
        (Path(__file__).parents[2] / "configs" / "inc_quant_with_fp8kv_one_node_config.json").read_text()
    )
    given = tmp_path / "given.json"
    given.write_text(
        json.dumps({**template, "dump_stats_path": "./scripts/nc_workspace_measure_kvcache/inc_measure_output"})
    )
    with pytest.raises(ConfigError, match="dump_stats_path is './scripts.*not in this run's measurements"):
        gaudi.resolve(run, meta, model=None, tp=None, quant_config=given, fp8_kv=None, write=False)
    given.write_text(json.dumps({**template, "dump_stats_path": str(run.unified(8) / "inc_measure_output")}))
    with pytest.raises(ConfigError, match="holds no measurements for TP 8 .*inc_measure_output_hooks_maxabs_0_8.json"):
        gaudi.resolve(run, meta, model=None, tp=None, quant_config=given, fp8_kv=None)
    assert gaudi.resolve(run, meta, model=None, tp=None, quant_config=given, fp8_kv=None, write=False).quant_config
    (run.unified(8) / "inc_measure_output_hooks_maxabs_0_8.json").write_text("{}")
    assert gaudi.resolve(run, meta, model=None, tp=None, quant_config=given, fp8_kv=None).quant_config == given


def test_a_tp1_unify_for_expand_does_not_become_the_serving_tp(tmp_path, run_cli):
    """vllm-gaudi's MoE recipe unifies to TP 1 and expands; beside unified-tp8, the run's target TP (run.json)
    is what infer serves and quantize configures, and without a target the two are refused, never picked."""
    from ray_calib.convert.pipeline import _run_measurements
    from ray_calib.runrecord import RunFactError, record_facts, start_record

    source = model(tmp_path, fp8=True)
    run, meta = run_with(tmp_path, source, fp8_kv=True)
    run.unified(1).mkdir()
    write_meta(run.unified(1), replace(meta, tp_size=1, ep_size=1))
    with pytest.raises(RunFactError, match="several unified directories"):
        _run_measurements(run)
    record_facts(start_record(run.root, "run-1", "measure", {}, []), "unify", {"target_tp": 8})
    result = run_cli("infer", "--serve", "--dry-run", "--device", "gaudi2", "--run-dir", run.root)
    assert result.exit_code == 0, result.stderr
    assert "--tensor-parallel-size 8" in result.stdout and "unified-tp8/inc_measure_output" in result.stdout
    assert _run_measurements(run) == run.unified(8)


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


def test_eval_on_gaudi_scores_the_measured_model_under_inc_against_itself_as_it_is(tmp_path, run_cli):
    """`eval` on Gaudi (no `<run>/fp8` there): the candidate is the measured model with the run's one-node
    QUANTIZE config, as `infer` serves it; the baseline is the same model without INC. A compressed-tensors
    checkpoint given as --candidate is loaded as it is."""
    source = model(tmp_path, fp8=False)
    run, _ = run_with(tmp_path, source, fp8_kv=True)
    result = run_cli("eval", "--device", "gaudi2", "--run-dir", run.root, "--dry-run")
    assert result.exit_code == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines()[1:])
    assert "TP 8 on hpu" in result.stdout.splitlines()[0]
    config = run.configs / "inc_quant_with_fp8kv_one_node_config.json"
    assert f"model={source}" in lines["candidate"] and f"QUANT_CONFIG={config}" in lines["candidate"]
    assert "quantization=inc" in lines["candidate"] and "kv_cache_dtype=fp8_inc" in lines["candidate"]
    assert "enable_expert_parallel=True" in lines["candidate"]
    assert f"model={source}" in lines["baseline"] and "QUANT_CONFIG" not in lines["baseline"]
    assert "quantization" not in lines["baseline"] and "kv_cache_dtype" not in lines["baseline"]
    assert not config.exists()  # a dry run writes nothing

    checkpoint = tmp_path / "run" / "fp8-gaudi2"
    checkpoint.mkdir()
    ct = json.loads((source / "config.json").read_text())
    ct["quantization_config"] = {"quant_method": "compressed-tensors", "kv_cache_scheme": {"type": "float"}}
    (checkpoint / "config.json").write_text(json.dumps(ct))
    result = run_cli("eval", "--device", "gaudi2", "--run-dir", run.root, "--candidate", checkpoint, "--dry-run")
    assert result.exit_code == 0, result.stderr
    candidate = next(line for line in result.stdout.splitlines() if line.startswith("candidate: "))
    assert f"model={checkpoint}" in candidate and "QUANT_CONFIG" not in candidate
    assert "kv_cache_dtype=fp8_inc" in candidate and "quantization=" not in candidate
