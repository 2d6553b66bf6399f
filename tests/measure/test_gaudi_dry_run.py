"""`measure --dry-run` / `infer --dry-run` for a Gaudi target, checked against the upstream scripts.

The upstream calibration scripts (vllm-gaudi `calibration/`, the DeepSeek quickstart of the HabanaAI fork)
are read from the shared reference directory beside the checkout (docs/design.md §10): engine arguments and
env parsed from their source, QUANT_CONFIGs produced by running their own shell function. Our plan must use
the same values, except the few differences named (and explained) here. Skipped when that directory is absent.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ray_calib.measure.plan import plan_measure
from ray_calib.measure.run import MeasureConfig
from tests.conftest import SHARED

REFERENCE = SHARED / "reference"
GAUDI_CALIBRATION = REFERENCE / "vllm-gaudi" / "calibration"
QUICKSTART = REFERENCE / "vllm-fork-deepseek_r1" / "scripts" / "quickstart" / "start_vllm.sh"

# DeepSeek-R1's config.json as published (the FP8 block checkpoint), enough for a plan.
DEEPSEEK_R1 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "vocab_size": 129280,
    "max_position_embeddings": 163840,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}
LLAMA_405B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 16384,
    "intermediate_size": 53248,
    "num_hidden_layers": 126,
    "num_attention_heads": 128,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
}


def reference(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"upstream reference not found at {path} (the shared directory beside the checkout is absent)")
    return path


def upstream_step2() -> tuple[dict, dict]:
    """(env set by step-2, LLM keyword -> value with argparse defaults resolved) from its source."""
    tree = ast.parse(reference(GAUDI_CALIBRATION / "step-2-measure-scales.py").read_text())
    env, defaults, llm = {}, {}, {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Subscript)
            and ast.unparse(node.targets[0].value) == "os.environ"
        ):
            env[node.targets[0].slice.value] = node.value.value
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "parser.add_argument":
            dest = node.args[-1].value.lstrip("-").replace("-", "_")
            keywords = {k.arg: k.value for k in node.keywords}
            if "default" in keywords:
                defaults[dest] = ast.literal_eval(keywords["default"])
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "vllm.LLM":
            llm = {k.arg: k.value for k in node.keywords}
    resolved = {}
    for key, value in llm.items():
        text = ast.unparse(value)
        resolved[key] = (
            defaults.get(text[5:], text)
            if text.startswith("args.")
            else ("bfloat16" if text == "torch.bfloat16" else ast.literal_eval(value))
        )
    return env, resolved


def upstream_config(kind: str, model_name: str, tmp_path: Path) -> dict:
    """Run calibrate_model.sh's own create_<kind>_config function and read what it wrote."""
    if shutil.which("bash") is None:
        pytest.skip("bash is needed to run the upstream shell function")
    script = reference(GAUDI_CALIBRATION / "calibrate_model.sh").read_text()
    function = re.search(rf"^create_{kind}_config\(\) \{{.*?^\}}", script, re.S | re.M)[0]
    subprocess.run(["bash", "-c", f"{function}\ncreate_{kind}_config {tmp_path} {model_name} g2"], check=True)
    return json.loads((tmp_path / model_name / f"maxabs_{kind}_g2.json").read_text())


@pytest.fixture
def cluster(tmp_path) -> Path:
    """Two Gaudi2 nodes, 8 cards each, with the reference flow's keys."""
    (tmp_path / "head_env.sh").write_text("export HCCL_OVER_OFI=1\n")
    (tmp_path / "worker_env.sh").write_text("export HCCL_OVER_OFI=1\n")
    conf = tmp_path / "devices.conf"
    conf.write_text(
        "RAY_CLUSTER_PORT=6379\nHEAD_NODE_IP=10.0.0.1\nHEAD_NODE_IFNAME=enp24s0f0\n"
        "HEAD_NODE_SOURCE_FILENAME=head_env.sh\nWORKER_NODE_IP=10.0.0.2\nWORKER_NODE_IFNAME=enp24s0f1\n"
        "WORKER_NODE_SOURCE_FILENAME=worker_env.sh\nDEVICE_KIND=hpu\nDEVICES_PER_NODE=8\n"
    )
    return conf


def model_dir(tmp_path: Path, name: str, config: dict) -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def plan_for(model: Path, conf: Path, tp: int, **extra):
    config = MeasureConfig(
        model=str(model),
        dataset=None,
        out=model.parent / "out",
        tp_size=tp,
        batch_size=32,
        device="gaudi2",
        ray_address="10.0.0.1:6379",
        cluster_conf=conf,
        **extra,
    )
    return plan_measure(config, load_data=False, dry_run=True)


def test_deepseek_measure_matches_upstream_step2(tmp_path, cluster, monkeypatch):
    monkeypatch.delenv("VLLM_TRACE_FUNCTION", raising=False)
    env, llm = upstream_step2()
    plan = plan_for(model_dir(tmp_path, "DeepSeek-R1", DEEPSEEK_R1), cluster, 16, fp8_kv=True).engine_plan()
    ours = plan.kwargs
    # the same values for every argument upstream passes (gpu_memory_utilization 0.9 is vLLM's default)
    shared = {k: v for k, v in llm.items() if k not in ("model", "gpu_memory_utilization")}
    assert shared == {
        "dtype": "bfloat16",
        "enforce_eager": False,
        "max_num_seqs": 32,
        "tensor_parallel_size": 1,
        "max_model_len": 2048,
        "trust_remote_code": True,
        "distributed_executor_backend": "mp",
        "enable_expert_parallel": False,
    }
    script = (GAUDI_CALIBRATION / "calibrate_model.sh").read_text()
    # calibrate_model.sh for DeepSeek: --expert-parallel, ray across nodes, the TP from -t
    assert 'EXTRA_FLAGS_STEP_2+="--block-quant --expert-parallel "' in script
    assert "--distributed-executor-backend ray" in script
    expected = {
        **shared,
        "tensor_parallel_size": 16,
        "distributed_executor_backend": "ray",
        "enable_expert_parallel": True,
    }
    assert {k: ours[k] for k in expected} == expected
    assert "gpu_memory_utilization" not in ours or ours["gpu_memory_utilization"] == llm["gpu_memory_utilization"]
    # no quantization argument for the FP8 checkpoint, no kv_cache_dtype while measuring: as upstream
    assert "quantization" not in llm and "quantization" not in ours
    assert "kv_cache_dtype" not in llm and "kv_cache_dtype" not in ours
    # env: step-2's own, plus calibrate_model.sh's for DeepSeek and TP > 1
    assert 'EXTRA_ENVS_STEP_2="VLLM_HPU_FORCE_CHANNEL_FP8=0"' in script
    assert "export PT_HPU_ENABLE_LAZY_COLLECTIVES=true" in script
    upstream_env = {**env, "VLLM_HPU_FORCE_CHANNEL_FP8": "0", "PT_HPU_ENABLE_LAZY_COLLECTIVES": "true"}
    assert {k: plan.env[k] for k in upstream_env} == upstream_env
    # QUANT_CONFIG: upstream's DeepSeek measure config, but stats dumped per chunk by us (no sample interval)
    upstream = upstream_config("measure", "deepseek-r1", tmp_path / "upstream")
    differ = {k for k in set(upstream) | set(plan.quant_config) if upstream.get(k) != plan.quant_config.get(k)}
    assert differ == {"dump_stats_path", "calibration_sample_interval"}
    assert plan.quant_config["dump_stats_path"].endswith("/inc_measure_output")
    # per node: the head runs ranks 0-7 and drives, the worker 8-15, each with its own IFNAME
    head, worker = plan.nodes
    assert (head.ranks, worker.ranks, head.driver) == (list(range(8)), list(range(8, 16)), True)
    assert worker.node_env["HCCL_SOCKET_IFNAME"] == worker.node_env["GLOO_SOCKET_IFNAME"] == "enp24s0f1"
    assert worker.node_env["VLLM_HOST_IP"] == "10.0.0.2"


def test_dense_bf16_measure(tmp_path, cluster):
    """A BF16 checkpoint gets quantization='inc' (the two-node prepare flow); dense means no EP."""
    plan = plan_for(model_dir(tmp_path, "Llama-3.1-405B", LLAMA_405B), cluster, 16)
    assert plan.route.name == "bf16" and plan.ep_size == 1
    kwargs = plan.engine_plan().kwargs
    assert kwargs["quantization"] == "inc" and "enable_expert_parallel" not in kwargs
    assert plan.quant_config["blocklist"] == {"types": ["KVCache", "VLLMKVCache"], "names": ["lm_head"]}
    assert upstream_config("measure", "llama-3.1-405b", tmp_path / "up")["blocklist"]["names"] == []
    assert "VLLM_HPU_FORCE_CHANNEL_FP8" not in plan.engine_plan().env


def test_routes_that_cannot_fit_are_refused(tmp_path, cluster):
    """DeepSeek-R1 in BF16 at TP 8: 168 GB per 96 GB card. The fix names the TP and the FP8 checkpoint."""
    from ray_calib.engine import gaudi
    from ray_calib.errors import EngineError
    from ray_calib.measure.preflight import valid_tp_sizes

    bf16 = {k: v for k, v in DEEPSEEK_R1.items() if k != "quantization_config"}
    plan = plan_for(model_dir(tmp_path, "DeepSeek-R1-bf16", bf16), cluster, 8)
    with pytest.raises(EngineError, match=r"does not fit at TP 8.*use --tp 16 or the FP8 checkpoint"):
        gaudi.check_fit(plan.fit, plan.route, valid_tp_sizes(plan.info), 16)
    fp8 = plan_for(model_dir(tmp_path, "DeepSeek-R1", DEEPSEEK_R1), cluster, 16)
    fp8.fit.hosts = {"head": 2000 << 30, "worker1": 200 << 30}  # the worker has too little host RAM
    with pytest.raises(EngineError, match="worker1: 3.. GiB host RAM for 8 ranks"):
        gaudi.check_fit(fp8.fit, fp8.route, valid_tp_sizes(fp8.info), 16)
    fp8.fit.hosts = {"head": 2000 << 30, "worker1": 2000 << 30}
    gaudi.check_fit(fp8.fit, fp8.route, valid_tp_sizes(fp8.info), 16)


def test_other_quantized_checkpoints_are_refused(tmp_path, cluster):
    from ray_calib.errors import ModelError

    awq = {**LLAMA_405B, "quantization_config": {"quant_method": "awq", "bits": 4}}
    with pytest.raises(ModelError, match="quantized with 'awq'"):
        plan_for(model_dir(tmp_path, "Llama-awq", awq), cluster, 16)


def test_measure_dry_run_cli(tmp_path, cluster, run_cli):
    model = model_dir(tmp_path, "DeepSeek-R1", DEEPSEEK_R1)
    result = run_cli("measure", "-m", model, "--conf", cluster, "--device", "gaudi2", "--fp8-kv", "--dry-run")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert out.startswith("ray-calib measure --dry-run: nothing is started")
    assert "TP 16, EP 16 (enable_expert_parallel), executor ray" in out
    assert "head 10.0.0.1 (driver): ranks 0-7 of 16" in out and "worker1 10.0.0.2: ranks 8-15 of 16" in out
    assert re.search(r"QUANT_CONFIG=/tmp/ray-calib-inc/[^/]+/inc_measure_config.json", out)
    assert "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY=PT_HPU_ENABLE_LAZY_COLLECTIVES,PT_HPU_WEIGHT_SHARING,QUANT_CONFIG" in out
    assert not (tmp_path / "out").exists()


def test_infer_dry_run_matches_the_quickstart_server(tmp_path, run_cli):
    """Gaudi serving: the measured model, the run's one-node QUANTIZE config, fp8_inc from its blocklist, EP."""
    script = reference(QUICKSTART).read_text()
    model = model_dir(tmp_path, "DeepSeek-R1", DEEPSEEK_R1)
    run = tmp_path / "run"
    (run / "unified-tp8").mkdir(parents=True)
    (run / "unified-tp8" / "ray_calib_meta.json").write_text(
        json.dumps(
            {
                "device_type": "gaudi2",
                "model": str(model),
                "tp_size": 8,
                "ep_size": 8,
                "fp8_kv": True,
                "unified_from": 16,
            }
        )
    )
    result = run_cli("infer", "--serve", "--device", "gaudi2", "--run-dir", run, "--dry-run")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    command = next(line for line in out.splitlines() if "vllm_cli serve" in line).split()
    # the quickstart's server: bf16, fp8_inc KV with INC, TP 8, remote code, no --quantization for the FP8 model
    for flag, value in (("--dtype", "bfloat16"), ("--kv-cache-dtype", "fp8_inc"), ("--tensor-parallel-size", "8")):
        assert re.search(rf"{flag} \S+", script)
        assert command[command.index(flag) + 1] == value
    assert "--trust-remote-code" in script and "--trust-remote-code" in command
    assert "--quantization" not in script and "--quantization" not in command
    assert "--enforce-eager" not in script and "--enforce-eager" not in command
    assert "--enable-expert-parallel" in command and "VLLM_EP_SIZE=8" in out and "export VLLM_EP_SIZE=8" in script
    for variable in ("PT_HPU_WEIGHT_SHARING=0", 'PT_HPU_ENABLE_LAZY_COLLECTIVES="true"'):
        assert f"export {variable}" in script and variable.replace('"', "") in out
    assert "KV_CACHE_DTYPE=fp8_inc" in script
    # the quickstart's bounded serving: its defaults read from the script, passed the same way
    default = {k: re.search(rf"^{k}=(\d+)$", script, re.M)[1] for k in ("max_model_len", "max_num_seqs")}
    assert "max_num_batched_tokens=$max_model_len" in script and "export VLLM_GRAPH_RESERVED_MEM=0.1" in script
    utilization = re.search(
        r"if \(\( max_model_len <= (\d+) \)\); then\s+export VLLM_GPU_MEMORY_UTILIZATION=(\S+)", script
    )
    assert int(default["max_model_len"]) <= int(utilization[1])
    for flag, value in (
        ("--max-model-len", default["max_model_len"]),
        ("--max-num-seqs", default["max_num_seqs"]),
        ("--max-num-batched-tokens", default["max_model_len"]),
        ("--gpu-memory-utilization", utilization[2]),
    ):
        assert flag in script.replace("_", "-") and command[command.index(flag) + 1] == value, flag
    assert "VLLM_GRAPH_RESERVED_MEM=0.1" in out
    quant = run / "configs" / "inc_quant_with_fp8kv_one_node_config.json"
    assert f"QUANT_CONFIG={quant}" in out and not quant.exists()  # a dry run writes nothing
    assert f'"dump_stats_path": "{run / "unified-tp8" / "inc_measure_output"}"' in out


def test_dry_run_probes_the_local_node(tmp_path, run_cli):
    """Without devices.conf the ranks run here: the dry run checks this node (model, host RAM) and shows the fit."""
    model = model_dir(tmp_path, "DeepSeek-R1", DEEPSEEK_R1)
    result = run_cli("measure", "-m", model, "--device", "gaudi2", "-t", 8, "--dry-run")
    assert result.exit_code == 0, result.stderr
    nodes_line = next(line for line in result.stdout.splitlines() if line.startswith("  nodes"))
    assert "model found" in nodes_line and "GiB host RAM available" in nodes_line
    assert "executor mp" in result.stdout
    (model / "config.json").rename(model / "moved.json")
    missing = run_cli("measure", "-m", model, "--device", "gaudi2", "-t", 8, "--dry-run")
    assert missing.exit_code == 1 and "no config.json" in missing.stderr


def test_a_relative_model_path_is_made_absolute(tmp_path, monkeypatch):
    """Ranks on other nodes resolve paths against their own working directory, and `quantize`/`infer` read the
    model from the meta from anywhere: a relative -m is resolved once, here."""
    from ray_calib.measure.preflight import resolve_model

    model_dir(tmp_path, "DeepSeek-R1", DEEPSEEK_R1)
    monkeypatch.chdir(tmp_path)
    info = resolve_model("DeepSeek-R1", weights=False)
    assert info.path == tmp_path / "DeepSeek-R1" and info.model_id == str(tmp_path / "DeepSeek-R1")


def test_gaudi_tp_above_this_nodes_cards_without_ray_is_refused(tmp_path, run_cli, monkeypatch):
    """Without a Ray cluster every rank runs here: hl-smi's card count bounds the TP (a dry run warns)."""
    from tests.engine.test_hlsmi import fake_hl_smi

    fake_hl_smi(tmp_path, "hl-smi-gaudi2.csv")  # 8 Gaudi2 cards
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("RAY_CALIB_DEVICES_CONF", raising=False)
    model = model_dir(tmp_path, "DeepSeek-R1", DEEPSEEK_R1)
    dry = run_cli("measure", "-m", model, "--device", "gaudi2", "-t", 16, "--dry-run")
    assert dry.exit_code == 0 and "which has 8 Gaudi cards (hl-smi): a real run refuses it" in dry.stdout
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"text": "hello"}\n')
    real = run_cli("measure", "-m", model, "--device", "gaudi2", "-t", 16, "-d", calib, "--run-dir", tmp_path / "run")
    assert (
        real.exit_code == 1
        and "--tp 16 needs 16 devices but this node (hl-smi, no Ray cluster) offers 8" in real.stderr
    )
    assert not (tmp_path / "run" / "measure").exists()


def test_hpu_conf_without_a_detectable_gaudi_asks_for_the_generation(tmp_path, cluster, run_cli, monkeypatch):
    """DEVICE_KIND=hpu on a machine that shows no Gaudi used to plan with CPU memory arithmetic."""
    monkeypatch.delenv("RAY_CALIB_DEVICE", raising=False)  # detected: this machine has no Gaudi
    model = model_dir(tmp_path, "DeepSeek-R1", DEEPSEEK_R1)
    result = run_cli("measure", "-m", model, "--conf", cluster, "--fp8-kv", "--dry-run")
    assert result.exit_code == 2 and result.stderr.count("error: ") == 1, result.stderr
    error = result.stderr.splitlines()[-1]
    assert "DEVICE_KIND=hpu" in error and "--device gaudi2 or --device gaudi3" in error


def test_a_checkpoint_measured_across_nodes_that_cannot_serve_on_one_node_is_said_before_measuring(tmp_path, cluster):
    """BF16 DeepSeek-R1 measures at TP 16 over two nodes but cannot serve at TP 8 on one: the plan says so (a
    warning, printed in real runs too), naming the FP8 checkpoint and serving across nodes. The FP8 block
    checkpoint at TP 16 serves on one node at the fork's 16k context: no such warning."""
    bf16 = {k: v for k, v in DEEPSEEK_R1.items() if k != "quantization_config"}
    plan = plan_for(model_dir(tmp_path, "DeepSeek-R1-bf16", bf16), cluster, 16)
    one_node = [w for w in plan.warnings if "will not serve on one node" in w]
    assert len(one_node) == 1, plan.warnings
    assert one_node[0].startswith("measured at TP 16, this checkpoint (bf16) will not serve on one node at TP 8: ")
    assert "GiB per card" in one_node[0] and "`infer -m <its FP8 dir>`" in one_node[0], one_node
    fp8 = plan_for(model_dir(tmp_path, "DeepSeek-R1", DEEPSEEK_R1), cluster, 16)
    assert not [w for w in fp8.warnings if "will not serve on one node" in w], fp8.warnings
