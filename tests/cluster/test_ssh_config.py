"""~/.ssh/config is honoured: host aliases, HostName, User, Port, IdentityFile, ProxyJump; devices.conf wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_calib.cluster import devices
from ray_calib.cluster.ssh import SSHRunner, resolve
from ray_calib.errors import ClusterError


def _conf(tmp_path: Path, body: str) -> devices.ClusterConfig:
    path = tmp_path / "devices.conf"
    path.write_text(
        "HEAD_NODE_IP=10.0.0.1\nHEAD_NODE_SSH_HOST=gaudi-head\nWORKER_NODE_IP=10.0.0.2\n"
        "WORKER_NODE_SSH_HOST=gaudi-worker\nDEVICE_KIND=cpu\n"
        f"SSH_CONFIG={tmp_path / 'ssh_config'}\n" + body
    )
    return devices.load(path)


def _ssh_config(tmp_path: Path) -> Path:
    key = tmp_path / "id_gaudi"
    key.write_text("not read by resolve\n")
    (tmp_path / "ssh_config").write_text(f"""\
Host gaudi-*
    User calib
    IdentityFile {key}
    ProxyJump admin@bastion.example.org:2222

Host gaudi-head
    HostName 192.168.7.11
    Port 2201

Host gaudi-worker
    HostName 192.168.7.12

Host bastion.example.org
    User jump
""")
    return key


def test_alias_resolves_hostname_user_port_key_and_jump(tmp_path):
    key = _ssh_config(tmp_path)
    cfg = _conf(tmp_path, "")
    head, worker = (resolve(node, cfg.ssh_config) for node in cfg.nodes)
    assert (head.hostname, head.port, head.user, head.key_filenames) == ("192.168.7.11", 2201, "calib", (str(key),))
    assert head.proxy_jump == "admin@bastion.example.org:2222"
    assert (worker.hostname, worker.port, worker.user) == ("192.168.7.12", 22, "calib")
    assert head.host_entry == "[192.168.7.11]:2201" and worker.host_entry == "192.168.7.12"


def test_devices_conf_values_win_over_ssh_config(tmp_path):
    _ssh_config(tmp_path)
    other = tmp_path / "other_key"
    other.write_text("x\n")
    cfg = _conf(tmp_path, f"SSH_USER=root\nHEAD_NODE_SSH_PORT=22\nSSH_KEY={other}\n")
    head = resolve(cfg.head, cfg.ssh_config)
    assert (head.hostname, head.port, head.user, head.key_filenames) == ("192.168.7.11", 22, "root", (str(other),))


def test_no_ssh_config_file_means_devices_conf_alone(tmp_path):
    cfg = _conf(tmp_path, "SSH_PORT=2022\nSSH_USER=me\n")  # ssh_config not written
    head = resolve(cfg.head, cfg.ssh_config)
    assert (head.hostname, head.port, head.user, head.key_filenames, head.proxy_jump) == (
        "gaudi-head",
        2022,
        "me",
        (),
        None,
    )


def test_jump_host_keys_are_verified_too(tmp_path):
    """ProxyJump does not weaken host-key checking: the bastion's unknown key is refused before any hop."""
    pytest.importorskip("paramiko")
    import socket
    import threading
    import time

    import paramiko

    host_key = paramiko.Ed25519Key.generate() if hasattr(paramiko.Ed25519Key, "generate") else None
    if host_key is None:
        host_key = paramiko.RSAKey.generate(2048)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def serve() -> None:  # an SSH server that only completes the key exchange
        conn, _ = server.accept()
        transport = paramiko.Transport(conn)
        transport.add_server_key(host_key)
        try:
            transport.start_server(server=paramiko.ServerInterface())
            deadline = time.monotonic() + 30
            while transport.is_active() and time.monotonic() < deadline:  # until the client hangs up
                time.sleep(0.05)
        except Exception:
            pass
        transport.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    (tmp_path / "ssh_config").write_text(f"Host gaudi-*\n    ProxyJump 127.0.0.1:{port}\n")
    cfg = _conf(tmp_path, f"SSH_KNOWN_HOSTS={tmp_path / 'known_hosts'}\nSSH_RETRIES=0\nSSH_CONNECT_TIMEOUT=60\n")
    with SSHRunner(cfg) as runner, pytest.raises(ClusterError) as err:
        runner.connect(cfg.head)
    assert "unknown SSH host key" in str(err.value) and f"[127.0.0.1]:{port}" in str(err.value), str(err.value)
    assert "--accept-new-host-keys" in str(err.value)
    server.close()
