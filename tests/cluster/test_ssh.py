"""SSHRunner against a real sshd: commands, SFTP, and every refusal (host keys, keys, unreachable)."""

from __future__ import annotations

import stat
import subprocess

import pytest

from ray_calib.cluster import devices
from ray_calib.cluster.ssh import SSHRunner
from ray_calib.errors import ClusterError
from ray_calib.testing.localnodes import write_conf

pytestmark = pytest.mark.cluster
OLD_IPS = {"head_ip": "127.0.0.1", "worker_ip": "127.0.0.2"}  # SSH only: no Ray is started here


def _config(workdir, sshd, extra: str = "", known_hosts=None):
    return devices.load(write_conf(workdir, sshd, extra=extra, known_hosts=known_hosts, **OLD_IPS))


def test_run_in_parallel_and_put_with_mode_0600(workdir, sshd, state_dir):
    cfg = _config(workdir, sshd)
    with SSHRunner(cfg, log_dir=workdir / "logs") as runner:
        results = runner.map(cfg.nodes, lambda n: runner.run(n, "echo out; echo err >&2; echo $SSH_CONNECTION; exit 3"))
        for node in cfg.nodes:
            res = results[node.name]
            assert (res.rc, res.stdout.splitlines()[0], res.stderr.strip()) == (3, "out", "err")
            assert res.stdout.split()[3] == node.ip  # really connected to that address
        runner.put(cfg.workers[0], b"secret-value", str(workdir / "sub" / "token"))
        late = runner.run(cfg.head, "sleep 5", timeout=1)
    target = workdir / "sub" / "token"
    assert target.read_bytes() == b"secret-value" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert late.rc == 124
    log = (workdir / "logs" / "worker1.log").read_text()
    assert "sftp put" in log and "secret-value" not in log


def test_unreachable_host_names_host_and_ssh_command(workdir, sshd, state_dir):
    cfg = _config(workdir, sshd, extra="WORKER_NODE_SSH_PORT=1\n")
    with SSHRunner(cfg) as runner, pytest.raises(ClusterError) as err:
        runner.connect(cfg.workers[0])
    text = str(err.value)
    assert text.startswith("worker1 (127.0.0.2): cannot reach sshd at 127.0.0.2:1 after 2 attempt(s)")
    assert "ssh -i" in text and "-p 1 " in text


def test_wrong_key_is_refused(workdir, sshd, state_dir):
    cfg = _config(workdir, sshd, extra=f"WORKER_NODE_SSH_KEY={sshd.root / 'other_key'}\n")
    with SSHRunner(cfg) as runner:
        runner.connect(cfg.head)
        with pytest.raises(ClusterError, match=r"worker1 \(127.0.0.2\): SSH authentication failed .*other_key"):
            runner.connect(cfg.workers[0])


def test_public_key_given_as_ssh_key_is_a_login_error_not_unreachable(workdir, sshd, state_dir):
    cfg = _config(workdir, sshd, extra=f"WORKER_NODE_SSH_KEY={sshd.root / 'client_key.pub'}\n")
    with SSHRunner(cfg) as runner, pytest.raises(ClusterError, match=r"SSH authentication failed .*client_key\.pub"):
        runner.connect(cfg.workers[0])


def _fingerprint(pub) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True).stdout
    return out.split()[1]


def test_unknown_host_key_refused_then_recorded_on_request(workdir, sshd, state_dir):
    known = sshd.known_hosts_file(workdir / "known_hosts", hosts=("127.0.0.1",))
    cfg = _config(workdir, sshd, known_hosts=known)
    with SSHRunner(cfg) as runner, pytest.raises(ClusterError) as err:
        runner.connect(cfg.workers[0])
    assert "worker1 (127.0.0.2): unknown SSH host key" in str(err.value)
    assert _fingerprint(sshd.root / "host_key.pub") in str(err.value) and "--accept-new-host-keys" in str(err.value)
    with SSHRunner(cfg, accept_new_host_keys=True) as runner:
        assert runner.run(cfg.workers[0], "true").ok
    assert f"[127.0.0.2]:{sshd.port} ssh-ed25519" in known.read_text()
    with SSHRunner(cfg) as runner:  # recorded: accepted from now on without the flag
        assert runner.run(cfg.workers[0], "true").ok


def test_changed_host_key_is_refused_even_with_accept_new(workdir, sshd, state_dir):
    other = " ".join((sshd.root / "other_key.pub").read_text().split()[:2])
    known = sshd.known_hosts_file(workdir / "known_hosts", key=other)
    cfg = _config(workdir, sshd, known_hosts=known)
    with SSHRunner(cfg, accept_new_host_keys=True) as runner, pytest.raises(ClusterError) as err:
        runner.connect(cfg.head)
    text = str(err.value)
    assert "head (127.0.0.1): SSH host key CHANGED" in text and "ssh-keygen -R" in text
    assert _fingerprint(sshd.root / "host_key.pub") in text and _fingerprint(sshd.root / "other_key.pub") in text


def test_ssh_config_alias_and_proxy_jump_reach_the_worker(workdir, sshd, state_dir):
    """The worker named by an alias, reached through the head as a ProxyJump bastion; host keys still checked."""
    ssh_config = workdir / "ssh_config"
    ssh_config.write_text(
        f"Host calib-worker\n    HostName 127.0.0.2\n    Port {sshd.port}\n"
        f"    IdentityFile {sshd.client_key}\n    ProxyJump 127.0.0.1:{sshd.port}\n"
        f"Host 127.0.0.1\n    IdentityFile {sshd.client_key}\n"
    )
    conf = write_conf(workdir, sshd, extra=f"SSH_CONFIG={ssh_config}\nWORKER_NODE_SSH_HOST=calib-worker\n", **OLD_IPS)
    text = conf.read_text().replace(f"SSH_PORT={sshd.port}\n", f"HEAD_NODE_SSH_PORT={sshd.port}\n")
    conf.write_text(text.replace(f"SSH_KEY={sshd.client_key}\n", f"HEAD_NODE_SSH_KEY={sshd.client_key}\n"))
    cfg = devices.load(conf)
    with SSHRunner(cfg) as runner:
        result = runner.run(cfg.workers[0], "echo $SSH_CONNECTION")
        assert result.ok and result.stdout.split()[2] == "127.0.0.2"
        assert len(runner._jumps) == 1  # went through the jump host
    bad = sshd.known_hosts_file(workdir / "known_hosts_head_only", hosts=("127.0.0.2",))
    conf.write_text(conf.read_text().replace(f"SSH_KNOWN_HOSTS={sshd.known_hosts}", f"SSH_KNOWN_HOSTS={bad}"))
    cfg = devices.load(conf)
    with (
        SSHRunner(cfg) as runner,
        pytest.raises(ClusterError, match=r"unknown SSH host key .*via|unknown SSH host key"),
    ):
        runner.connect(cfg.workers[0])
