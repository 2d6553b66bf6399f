"""Gaudi-specific cluster checks that need no hosts: preflight's judgement of hl-smi facts, env-file side
effects of the hand-run flow's env files, and devices.conf keys used as defaults by measure/infer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_calib.cluster import devices
from ray_calib.cluster.envfiles import lint
from ray_calib.cluster.preflight import judge

# What the hand-run flow's head_node_source.sh does (summarised from the upstream file, shortened).
REFERENCE_ENV = """ray stop --force
export HCCL_OVER_OFI=1
export PT_HPU_WEIGHT_SHARING=0
export VLLM_SKIP_WARMUP=true
export VLLM_TRACE_FUNCTION=1   # debug only
export VLLM_LOGGING_LEVEL=DEBUG
source utils.sh
set_bucketing
# ray stop in a comment is fine
unset QUANT_CONFIG
"""


def gaudi_conf(tmp_path: Path, extra: str = "") -> devices.ClusterConfig:
    (tmp_path / "head_env.sh").write_text(REFERENCE_ENV)
    (tmp_path / "worker_env.sh").write_text("export HCCL_OVER_OFI=1\n")
    (tmp_path / "devices.conf").write_text(f"""RAY_CLUSTER_PORT=6379
HEAD_NODE_IP=10.0.0.1
HEAD_NODE_IFNAME=enp24s0f0
HEAD_NODE_SOURCE_FILENAME=head_env.sh
WORKER_NODE_IP=10.0.0.2
WORKER_NODE_IFNAME=enp24s0f1
WORKER_NODE_SOURCE_FILENAME=worker_env.sh
DEVICE_KIND=hpu
DEVICES_PER_NODE=8
{extra}""")
    return devices.load(tmp_path / "devices.conf")


@pytest.fixture
def tiny_llama_dir(tmp_path) -> Path:
    """A model directory as far as a dry run reads it (config.json)."""
    model = tmp_path / "Llama-3.1-8B"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "hidden_size": 4096,
                "num_hidden_layers": 32,
                "intermediate_size": 14336,
                "vocab_size": 128256,
                "max_position_embeddings": 131072,
            }
        )
    )
    return model


def facts(gaudi: dict | None) -> dict:
    return {
        "packages": {"ray": "2.60.0", "ray-calib": "0.1.0"},
        "python": "3.11.2",
        "executable": "/usr/bin/python3",
        "devices": {"hpu": 8},
        "ifaces": {"enp24s0f0": ["10.0.0.1/24"], "enp24s0f1": ["10.0.0.2/24"]},
        "work_dir": True,
        "free_gb": 100.0,
        "gaudi": gaudi,
    }


def test_env_file_side_effects_are_reported_with_their_lines(tmp_path):
    conf = gaudi_conf(tmp_path)
    warnings = lint(conf.head.source_file)
    assert [w.split(": ", 1)[0].rsplit(":", 1)[1] for w in warnings] == ["1", "5", "6", "7"]
    assert "ends every Ray process on the host" in warnings[0]
    assert "VLLM_TRACE_FUNCTION=1" in warnings[1] and "DEBUG" in warnings[2] and "utils.sh" in warnings[3]
    assert lint(conf.workers[0].source_file) == []


def test_config_check_prints_the_warnings(tmp_path, run_cli):
    conf = gaudi_conf(tmp_path)
    result = run_cli("cluster", "check", "--conf", conf.path)
    assert result.exit_code == 0
    assert result.stderr.count("warning: ") == 4 and "head_env.sh:1:" in result.stderr


def test_preflight_judges_hl_smi_facts(tmp_path):
    conf = gaudi_conf(tmp_path)
    head = facts({"names": ["HL-225"], "driver": ["1.21.0-ca59b5a"]})
    assert judge(conf.head, head, head, conf) == []
    worker = facts({"names": ["HL-225"], "driver": ["1.20.1-366eb9c"]})
    assert judge(conf.workers[0], worker, head, conf) == ["Habana driver 1.20.1-366eb9c != head 1.21.0-ca59b5a"]
    gaudi1 = facts({"names": ["HL-205"], "driver": ["1.21.0-ca59b5a"]})
    problems = judge(conf.workers[0], gaudi1, head, conf)
    assert any("unknown Gaudi device 'HL-205'" in p for p in problems) and any("!= head HL-225" in p for p in problems)
    assert judge(conf.workers[0], facts(None), head, conf) == [
        "hl-smi not found (the Habana driver tools are needed to read the Gaudi type)"
    ]


def test_preflight_compares_gaudi_stack_versions(tmp_path):
    conf = gaudi_conf(tmp_path)
    gaudi = {"names": ["HL-225"], "driver": ["1.21.0-ca59b5a"]}
    head = facts(gaudi)
    head["packages"].update({"vllm-gaudi": "0.11.2", "habana-torch-plugin": "1.21.0.555"})
    worker = facts(gaudi)
    worker["packages"].update({"vllm-gaudi": "0.11.1", "habana-torch-plugin": "1.21.0.555"})
    assert judge(conf.workers[0], worker, head, conf) == ["vllm-gaudi 0.11.1 != head 0.11.2"]


def test_reference_keys_become_measure_defaults(tmp_path, run_cli, tiny_llama_dir):
    """INC_MEASURE_CONFIG_FILENAME, CALIBRATION_* and TENSOR_PARALLEL_SIZE reach measure's plan."""
    fp8kv = Path(__file__).parents[2] / "configs" / "inc_measure_with_fp8kv_config.json"
    conf = gaudi_conf(
        tmp_path,
        f"INC_MEASURE_CONFIG_FILENAME={fp8kv}\nCALIBRATION_SAMPLE_LENGTH=1024\n"
        "CALIBRATION_MAX_BATCH_SIZE=4\nTENSOR_PARALLEL_SIZE=4\n",
    )
    result = run_cli("measure", "-m", tiny_llama_dir, "--conf", conf.path, "--device", "gaudi2", "--dry-run")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "TP 4, EP 1" in out and "max_num_seqs=4" in out
    assert "K/V ranges recorded: yes" in out  # the fp8kv measure config from devices.conf, KV types not blocked
    assert "--least-tokens 1024" in out
    assert "warning" not in result.stderr
    assert "head_env.sh:1: runs `ray stop`" in out
