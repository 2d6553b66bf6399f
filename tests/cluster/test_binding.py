"""`up`'s binding check: the pure comparison with devices.conf, and the probe on real local processes."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from ray_calib.cluster import binding, devices
from ray_calib.testing.localnodes import HEAD_IP, WORKER_IP

CONF = """HEAD_NODE_IP={head}
HEAD_NODE_IFNAME=lo
WORKER_NODE_IP={worker}
WORKER_NODE_IFNAME=lo
RAY_CLUSTER_PORT=6380
DEVICE_KIND=cpu
"""


def config(tmp_path, head=HEAD_IP, worker=WORKER_IP):
    path = tmp_path / "devices.conf"
    path.write_text(CONF.format(head=head, worker=worker))
    return devices.load(path)


def facts(ip: str, gcs: str, listen=(), env=None, head=True):
    """Probe output as `binding._PROBE` prints it (names, flags, listening sockets, the raylet's env)."""
    env = env if env is not None else {"VLLM_HOST_IP": ip, "GLOO_SOCKET_IFNAME": "lo"}
    procs = [{"pid": 2, "name": "raylet", "flags": {"--node-ip-address": ip}, "listen": list(listen), "env": env}]
    procs.append({"pid": 3, "name": "agent.py", "flags": {"--gcs-address": gcs}, "listen": [], "env": {}})
    if head:
        procs.append({"pid": 1, "name": "gcs_server", "flags": {"--node-ip-address": ip}, "listen": [], "env": {}})
    return {"processes": procs, "ifaces": {"lo": ["127.0.0.1/8"], "eth0": ["192.0.2.2/24"]}}


def test_nodes_bound_where_configured_pass(tmp_path):
    cfg = config(tmp_path)
    head = binding.problems(cfg.head, cfg, facts(HEAD_IP, cfg.address, [(HEAD_IP, 6380), ("127.0.0.1", 8265)]), HEAD_IP)
    worker = binding.problems(cfg.workers[0], cfg, facts(WORKER_IP, cfg.address, head=False), WORKER_IP)
    assert head.problems == [] and worker.problems == []
    assert head.listening == [f"raylet {HEAD_IP}:6380", "raylet 127.0.0.1:8265"]


def test_a_head_on_127_0_0_1_that_ray_moved_is_named_with_both_addresses_and_the_fix(tmp_path):
    """What `ray start --node-ip-address 127.0.0.1` does: everything runs on the host's primary address."""
    cfg = config(tmp_path, head="127.0.0.1")
    found = binding.problems(cfg.head, cfg, facts("192.0.2.2", "192.0.2.2:6380"), "192.0.2.2")
    assert found.problems[0] == "Ray runs it on 192.0.2.2, not the configured 127.0.0.1"
    assert "agent.py uses GCS 192.0.2.2:6380, not 127.0.0.1:6380" in found.problems
    assert "VLLM_HOST_IP is 127.0.0.1, not 192.0.2.2" not in found.problems  # the env was ours: it is 127.0.0.1
    assert "set HEAD_NODE_IP to another address" in binding.fix(found) and "127.0.0.3" in binding.fix(found)


def test_node_env_must_agree_with_the_ip_and_ifname(tmp_path):
    cfg = config(tmp_path)
    env = {"VLLM_HOST_IP": "192.0.2.2", "GLOO_SOCKET_IFNAME": "eth0"}
    found = binding.problems(cfg.workers[0], cfg, facts(WORKER_IP, cfg.address, env=env, head=False), WORKER_IP)
    assert found.problems == [
        f"VLLM_HOST_IP is 192.0.2.2, not {WORKER_IP}",
        "GLOO_SOCKET_IFNAME is eth0, not IFNAME lo",
    ]
    assert "WORKER_NODE_IP" not in binding.fix(found) and "up --restart" in binding.fix(found)


def test_wildcard_and_foreign_listeners_are_refused_loopback_and_mapped_node_ip_are_not(tmp_path):
    cfg = config(tmp_path)
    ports = [
        ("0.0.0.0", 44217),
        ("::", 6380),
        ("192.0.2.2", 1234),
        ("::ffff:" + HEAD_IP, 5),
        ("::1", 6),
        ("127.0.0.1", 7),
    ]
    found = binding.problems(cfg.head, cfg, facts(HEAD_IP, cfg.address, ports), HEAD_IP)
    assert found.problems == [
        "raylet listens on 0.0.0.0:44217 (all interfaces)",
        "raylet listens on :::6380 (all interfaces)",
        "raylet listens on 192.0.2.2:1234 (another address)",
    ]
    assert binding.problems(cfg.head, cfg, facts(HEAD_IP, cfg.address, ports), HEAD_IP, listening=False).problems == []


def test_the_probe_sees_a_processs_flags_env_and_listening_sockets(tmp_path):
    """The probe on this machine: a stand-in 'raylet' of a temp dir, listening on the node IP and a wildcard."""
    temp = tmp_path / "ray"
    code = (
        "import socket, sys, time\n"
        "a = socket.socket(); a.bind((sys.argv[1], 0)); a.listen()\n"
        "b = socket.socket(); b.bind(('0.0.0.0', 0)); b.listen()\n"
        "print(a.getsockname()[1], b.getsockname()[1], flush=True); time.sleep(60)\n"
    )
    env = {"VLLM_HOST_IP": HEAD_IP, "GLOO_SOCKET_IFNAME": "lo", "PATH": "/usr/bin:/bin"}
    args = [sys.executable, "-c", code, HEAD_IP, f"--temp-dir={temp}", f"--node-ip-address={HEAD_IP}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
    try:
        ports = [int(p) for p in proc.stdout.readline().split()]
        out = subprocess.run(
            ["bash", "-c", binding.probe_script(_node(tmp_path, temp))], capture_output=True, text=True
        )
        found = binding.parse(out.stdout)
    finally:
        proc.kill()
        proc.wait()
    (row,) = [p for p in found["processes"] if p["pid"] == proc.pid]
    assert row["flags"] == {"--node-ip-address": HEAD_IP}
    assert sorted(map(tuple, row["listen"])) == sorted([(HEAD_IP, ports[0]), ("0.0.0.0", ports[1])])
    assert "127.0.0.1/8" in found["ifaces"]["lo"]


def _node(tmp_path, temp):
    cfg = config(tmp_path)
    from dataclasses import replace

    return replace(cfg.head, temp_dir=str(temp), python=sys.executable)


def test_the_bind_shim_moves_wildcard_binds_to_the_node_ip_and_leaves_explicit_ones(tmp_path):
    """The lines `ray start` runs with: build the shim with the node's cc, preload it, bind like Ray does."""
    import shutil
    from dataclasses import replace

    from ray_calib.cluster.bindshim import preload_lines

    if not shutil.which("cc"):
        pytest.skip("no C compiler here")
    node = replace(config(tmp_path).head, temp_dir=str(tmp_path / "ray" / "head"))
    code = (
        "import socket\n"
        "a = socket.socket(); a.bind(('0.0.0.0', 0)); a.listen()\n"
        "b = socket.socket(socket.AF_INET6); b.bind(('::', 0)); b.listen()\n"
        "c = socket.socket(); c.bind(('127.0.0.1', 0)); c.listen()\n"
        "socket.create_connection(('" + HEAD_IP + "', b.getsockname()[1])).close()\n"
        "print(a.getsockname()[0], b.getsockname()[0], c.getsockname()[0])\n"
    )
    script = "\n".join([*preload_lines(node), f"{sys.executable} -c {shlex.quote(code)}"])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [HEAD_IP, f"::ffff:{HEAD_IP}", "127.0.0.1"]
    assert preload_lines(replace(node, ip="127.0.0.1")) == []  # Ray moves that IP anyway: the check reports it
