"""devices.conf: the seeds' file as is, our extensions, and every kind of mistake with its line number."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ray_calib.cluster import devices
from ray_calib.cluster.ray_nodes import node_env, start_args, start_script
from ray_calib.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

SEED = """\
RAY_CLUSTER_PORT=8850
HEAD_NODE_IP=10.10.1.2
HEAD_NODE_IFNAME=enp24s0f0np0
HEAD_NODE_SOURCE_FILENAME=head_node_source.sh
WORKER_NODE_IP=10.10.1.3
WORKER_NODE_IFNAME=enp24s0f0np0
WORKER_NODE_SOURCE_FILENAME=worker_node_source.sh
INC_MEASURE_CONFIG_FILENAME=inc_measure_config.json
INC_QUANT_CONFIG_FILENAME=inc_quant_config.json
CALIBRATION_SAMPLE_LENGTH=1024
CALIBRATION_MAX_BATCH_SIZE=32
"""


def _files(directory: Path) -> None:
    for name in ("head_node_source.sh", "worker_node_source.sh", "inc_measure_config.json", "inc_quant_config.json"):
        (directory / name).write_text("# x\n")


def _write(tmp_path: Path, text: str) -> Path:
    _files(tmp_path)
    path = tmp_path / "devices.conf"
    path.write_text(text)
    return path


def _problems(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as err:
        devices.load(_write(tmp_path, text))
    return str(err.value)


def test_seed_file_is_accepted_as_is(tmp_path):
    cfg = devices.load(_write(tmp_path, SEED))
    assert [n.name for n in cfg.nodes] == ["head", "worker1"]
    assert cfg.address == "10.10.1.2:8850"
    assert cfg.workers[0].ifname == "enp24s0f0np0"
    assert cfg.head.source_file == str(tmp_path / "head_node_source.sh")
    assert cfg.head.device_kind == "hpu" and cfg.tensor_parallel_size == 16
    assert cfg.extras["CALIBRATION_MAX_BATCH_SIZE"] == 32
    assert cfg.work_dir == str(tmp_path)


def test_extensions_more_workers_overrides_quotes_and_expansion(tmp_path):
    text = (
        SEED
        + """
export SSH_USER=calib
DEVICE_KIND=cuda
DEVICES_PER_NODE=4
WORKER2_NODE_IP=10.10.1.4   # third node
WORKER2_NODE_SSH_PORT=2222
WORKER2_NODE_DEVICES=2
WORKER2_NODE_RAY_TEMP_DIR="/tmp/ray two"
WORKER2_NODE_SSH_HOST=${WORKER2_NODE_IP}
RAY_MEMORY=1G
"""
    )
    cfg = devices.load(_write(tmp_path, text))
    third = cfg.nodes[2]
    assert (third.name, third.ssh_port, third.devices, third.temp_dir) == ("worker2", 2222, 2, "/tmp/ray two")
    assert third.ssh_host == "10.10.1.4" and third.ssh_user == "calib" and third.memory == 2**30
    assert cfg.tensor_parallel_size == 4 + 4 + 2


@pytest.mark.parametrize(
    "line, expect",
    [
        ("HEAD_NODE_IPP=1.2.3.4", "line 12: unknown key HEAD_NODE_IPP (did you mean HEAD_NODE_IP?)"),
        ("WORKER2_NODE_IP=10.10.1.300", "line 12: WORKER2_NODE_IP='10.10.1.300': not an IP address"),
        ("RAY_CLUSTER_PORT=6380", "line 12: RAY_CLUSTER_PORT set again (first set on line 1)"),
        ("WORKER2_NODE_IP=10.10.1.3", "line 12: worker2 has the same IP 10.10.1.3 as worker1"),
        ("SSH_KEY=no_such_key", "line 12: SSH_KEY: file not found"),
        ("just some words", "line 12: expected KEY=VALUE"),
        ("SSH_PORT = 22", "line 12: expected KEY=VALUE"),
        ("SSH_PORT=abc", "line 12: SSH_PORT='abc': not a whole number"),
        ("DEVICE_KIND=tpu", "line 12: DEVICE_KIND='tpu': device kind must be one of hpu, cuda, cpu"),
        ("WORKER3_NODE_IP=10.10.1.9", "line 12: worker numbers must be consecutive: worker2 is missing"),
        ("WORKER2_NODE_IFNAME=eth0", "line 12: WORKER2_NODE_IP is missing"),
        ("TENSOR_PARALLEL_SIZE=32", "line 12: TENSOR_PARALLEL_SIZE: tp(32) > devices(16)"),
        ('SSH_USER="a b', "line 12: SSH_USER: No closing quotation"),
        (
            "WORKER_NODE_RAY_TEMP_DIR=/tmp/pytest-of-root/pytest-75/test_demo/cluster/ray",
            "line 12: WORKER_NODE_RAY_TEMP_DIR: /tmp/pytest-of-root/pytest-75/test_demo/cluster/ray"
            " is longer than 43 bytes",
        ),
        ("TENSOR_PARALLEL_SIZE=0", "line 12: TENSOR_PARALLEL_SIZE must be >= 1"),
        ("RAY_AUTH_TOKEN_PATH=tok", "line 12: RAY_AUTH_TOKEN_PATH: give an absolute path or ~/..."),
        ("WORKER0_NODE_IP=10.10.1.9", "line 12: unknown key WORKER0_NODE_IP"),
        ("WORKER2_NODE_IP=$NOT_SET_ANYWHERE", "line 12: WORKER2_NODE_IP is empty"),
    ],
)
def test_mistakes_name_their_line(tmp_path, line, expect):
    assert expect in _problems(tmp_path, SEED + line + "\n")


def test_all_problems_at_once_and_missing_head(tmp_path):
    message = _problems(tmp_path, "FOO=1\nBAR=2\n")
    assert "3 problem(s)" in message and "line 1: unknown key FOO" in message and "HEAD_NODE_IP is missing" in message


def test_missing_source_file(tmp_path):
    path = _write(tmp_path, SEED)
    (tmp_path / "worker_node_source.sh").unlink()
    with pytest.raises(ConfigError, match="line 7: WORKER_NODE_SOURCE_FILENAME: file not found"):
        devices.load(path)


def test_example_file_parses(tmp_path):
    shutil.copy(REPO / "cluster" / "devices.conf.example", tmp_path / "devices.conf")
    for name in (
        "head_node_source.sh",
        "worker_node_source.sh",
        "inc_measure_g2_config.json",
        "inc_quant_g2_config.json",
    ):
        (tmp_path / name).write_text("")
    cfg = devices.load(tmp_path / "devices.conf")
    assert [n.ip for n in cfg.nodes] == ["10.0.0.1", "10.0.0.2"]


def test_config_check_command(tmp_path, run_cli):
    good = run_cli("cluster", "check", "--conf", _write(tmp_path, SEED))
    assert good.exit_code == 0 and "worker1" in good.stdout and "10.10.1.3" in good.stdout
    (tmp_path / "devices.conf").write_text(SEED + "OOPS\n")
    bad = run_cli("cluster", "check", "--conf", tmp_path / "devices.conf")
    assert bad.exit_code == 2 and "line 12: expected KEY=VALUE" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_ray_start_arguments_and_node_env(tmp_path):
    cfg = devices.load(_write(tmp_path, SEED + "RAY_OBJECT_STORE_MEMORY=200M\n"))
    head = start_args(cfg.head, cfg)
    assert head[head.index("--dashboard-host") + 1] == "127.0.0.1"
    assert head[head.index("--port") + 1] == "8850" and "--head" in head
    assert json.loads(head[head.index("--resources") + 1]) == {"HPU": 8}
    assert head[head.index("--object-store-memory") + 1] == str(200 * 2**20)
    worker = start_args(cfg.workers[0], cfg)
    assert worker[worker.index("--address") + 1] == "10.10.1.2:8850" and "--head" not in worker
    env = node_env(cfg.workers[0], cfg.token_path)
    assert env["VLLM_HOST_IP"] == "10.10.1.3" and env["HCCL_SOCKET_IFNAME"] == "enp24s0f0np0"
    assert env["RAY_AUTH_TOKEN_PATH"] == '"$HOME"/.ray/auth_token' and "NCCL_SOCKET_IFNAME" not in env
    script = start_script(cfg.workers[0], cfg)
    assert script.index("worker_node_source.sh") < script.index("VLLM_HOST_IP") < script.index("ray.scripts")


def test_cuda_nodes_use_gpus_and_nccl(tmp_path):
    cfg = devices.load(_write(tmp_path, SEED + "DEVICE_KIND=cuda\n"))
    args = start_args(cfg.head, cfg)
    assert args[args.index("--num-gpus") + 1] == "8" and "--resources" not in args
    assert node_env(cfg.head, cfg.token_path)["NCCL_SOCKET_IFNAME"] == "enp24s0f0np0"


def test_fingerprint_changes_only_with_what_ray_is_started_with(tmp_path):
    base = devices.load(_write(tmp_path, SEED)).fingerprint()
    calib = SEED.replace("CALIBRATION_MAX_BATCH_SIZE=32", "CALIBRATION_MAX_BATCH_SIZE=8") + "SSH_CONNECT_TIMEOUT=3\n"
    assert devices.load(_write(tmp_path, calib)).fingerprint() == base
    moved = SEED.replace("WORKER_NODE_IFNAME=enp24s0f0np0", "WORKER_NODE_IFNAME=eth1")
    assert devices.load(_write(tmp_path, moved)).fingerprint() != base


def test_empty_head_ip_never_promotes_a_worker_and_non_utf8_is_one_line(tmp_path):
    assert "line 2: HEAD_NODE_IP is empty" in _problems(
        tmp_path, SEED.replace("HEAD_NODE_IP=10.10.1.2", "HEAD_NODE_IP=$NOPE")
    )
    path = _write(tmp_path, SEED)
    path.write_bytes(SEED.encode() + b"FOO=\xff\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        devices.load(path)


def test_crlf_env_file_is_refused_with_its_line(tmp_path):
    path = _write(tmp_path, SEED)
    (tmp_path / "worker_node_source.sh").write_bytes(b"# env\nexport A=1\r\nexport B=2\r\n")
    with pytest.raises(ConfigError) as err:
        devices.load(path)
    message = str(err.value)
    assert "line 7: WORKER_NODE_SOURCE_FILENAME" in message
    assert f"{tmp_path / 'worker_node_source.sh'}:2 ends in CR" in message and "sed -i" in message


def test_node_prelude_refuses_crlf_env_file_on_the_host(tmp_path):
    import subprocess

    from ray_calib.cluster.ray_nodes import node_prelude

    path = _write(tmp_path, SEED)
    cfg = devices.load(path)
    env_file = tmp_path / "worker_node_source.sh"
    env_file.write_text("export A=1\n")
    ok = subprocess.run(["sh", "-c", node_prelude(cfg.workers[0]) + "\necho A=$A"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "A=1"
    env_file.write_bytes(b"export A=1\r\n")
    bad = subprocess.run(["sh", "-c", node_prelude(cfg.workers[0]) + "\necho A=$A"], capture_output=True, text=True)
    assert bad.returncode == 97 and "Windows line endings" in bad.stderr and bad.stdout == ""
