"""A two-node cluster on this one machine, for the demo, the cluster tests and benchmarks/bench_up.py.

A real sshd on 127.0.0.1 to 127.0.0.4 with generated host and client keys, and a devices.conf that
uses it (two CPU nodes, head 127.0.0.3 and worker 127.0.0.4: addresses this box uses for nothing else, so
a Ray process bound elsewhere -- the host's primary address, 127.0.0.1 -- is seen by `up`'s binding check;
Ray itself replaces a node IP of 127.0.0.1). The sshd is installed from Debian (apt-get) when missing,
listens on a free high port on those loopback addresses, and is killed by pid on exit. By default the Ray
nodes use free ports (GCS, client server, dashboard: two runs on one box do not collide) and private temp
dirs beside the conf.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ray_calib.cluster.devices import MAX_RAY_TEMP_DIR_BYTES

VENV_BIN = Path(sys.executable).parent
HEAD_IP, WORKER_IP = "127.0.0.3", "127.0.0.4"
SSHD_ADDRESSES = ("127.0.0.1", "127.0.0.2", HEAD_IP, WORKER_IP)


@dataclass
class Sshd:
    port: int
    root: Path
    client_key: Path
    host_pub: str
    known_hosts: Path  # holds both nodes' host keys

    def known_hosts_file(self, path: Path, hosts: tuple[str, ...] = SSHD_ADDRESSES, key: str | None = None) -> Path:
        path.write_text("".join(f"[{h}]:{self.port} {key or self.host_pub}\n" for h in hosts))
        return path


class SshdUnavailable(RuntimeError):
    pass


def _free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on every local address right now (held open together while chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in socks]


def _ensure_sshd() -> str:
    found = shutil.which("sshd") or (os.path.exists("/usr/sbin/sshd") and "/usr/sbin/sshd")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SshdUnavailable("sshd missing and cannot apt-get install openssh-server (needs root + Debian)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server"], check=True, env=env, capture_output=True)
    return "/usr/sbin/sshd"


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@contextlib.contextmanager
def running_sshd() -> Iterator[Sshd]:
    """Start sshd on SSHD_ADDRESSES (free port, fresh keys); kill it by pid on exit."""
    binary = _ensure_sshd()
    root = Path(tempfile.mkdtemp(prefix="rc-cluster-sshd-"))
    os.chmod(root, 0o755)
    for name in ("host_key", "client_key", "other_key"):
        _keygen(root / name)
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    port = _free_port()
    listen = "".join(f"ListenAddress {ip}\n" for ip in SSHD_ADDRESSES)
    (root / "sshd_config").write_text(
        f"Port {port}\n{listen}HostKey {root / 'host_key'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPidFile {root / 'sshd.pid'}\nStrictModes no\n"
        "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin yes\n"
        "MaxSessions 50\nMaxStartups 50\nSubsystem sftp internal-sftp\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)
    proc = subprocess.Popen(
        [binary, "-D", "-e", "-f", str(root / "sshd_config")],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "sshd.log", "w"),
        start_new_session=True,  # a terminal's Ctrl-C must not end it: `down` still needs it afterwards
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.2", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd did not start: {(root / 'sshd.log').read_text()}") from None
                time.sleep(0.1)
        host_pub = " ".join((root / "host_key.pub").read_text().split()[:2])
        server = Sshd(port, root, root / "client_key", host_pub, root / "known_hosts")
        server.known_hosts_file(server.known_hosts)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def write_conf(
    directory: Path,
    sshd: Sshd,
    *,
    gcs_port: int | None = None,
    dashboard_port: int | None = None,
    extra: str = "",
    head_env: str = "",
    worker_env: str = "",
    known_hosts: Path | None = None,
    memory: str = "1G",
    devices_per_node: int = 1,
    fast_failure_detection: bool = True,
    num_cpus: int | None = None,
    head_ip: str = HEAD_IP,
    worker_ip: str = WORKER_IP,
) -> Path:
    """Two CPU nodes (head `head_ip`, worker `worker_ip`) on this box, `devices_per_node` HPU each.

    `num_cpus` (default: `devices_per_node`) is Ray's CPU count per node; vLLM's rank actors ask for none,
    and Ray starts that many idle worker processes per node, so many ranks on a small box want it low.

    `fast_failure_detection` shortens the GCS health checks so a killed node shows as dead within
    ~15 s (the tests; a stricter check marked a busy but living raylet dead); a 2-core box running vLLM
    ranks for minutes needs Ray's defaults (the demo).
    """
    directory.mkdir(parents=True, exist_ok=True)
    free = free_ports(3)
    gcs_port, client_port, dashboard_port = gcs_port or free[0], free[1], dashboard_port or free[2]
    path_line = f'export PATH="{VENV_BIN}:$PATH"\n'
    health = (
        (
            "export RAY_health_check_period_ms=1000 RAY_health_check_failure_threshold=10 "
            "RAY_health_check_timeout_ms=3000\n"
        )
        if fast_failure_detection
        else ""
    )
    (directory / "head_env.sh").write_text(path_line + health + head_env)
    (directory / "worker_env.sh").write_text(path_line + worker_env)
    temp = directory / "ray"
    if len(f"{temp}/worker".encode()) > MAX_RAY_TEMP_DIR_BYTES:  # e.g. under pytest's tmp_path
        temp = Path(tempfile.mkdtemp(prefix="rc-ray-", dir="/tmp"))
    conf = directory / "devices.conf"
    conf.write_text(f"""# two nodes on one box
RAY_CLUSTER_PORT={gcs_port}
RAY_CLIENT_SERVER_PORT={client_port}
RAY_DASHBOARD_PORT={dashboard_port}
HEAD_NODE_IP={head_ip}
HEAD_NODE_IFNAME=lo
HEAD_NODE_SOURCE_FILENAME=head_env.sh
HEAD_NODE_RAY_TEMP_DIR={temp}/head
WORKER_NODE_IP={worker_ip}
WORKER_NODE_IFNAME=lo
WORKER_NODE_SOURCE_FILENAME=worker_env.sh
WORKER_NODE_RAY_TEMP_DIR={temp}/worker
DEVICE_KIND=cpu
DEVICES_PER_NODE={devices_per_node}
RAY_NUM_CPUS={devices_per_node if num_cpus is None else num_cpus}
RAY_MEMORY={memory}
RAY_OBJECT_STORE_MEMORY=200M
MIN_FREE_DISK_GB=1
HEALTH_TIMEOUT=90
SSH_PORT={sshd.port}
SSH_KEY={sshd.client_key}
SSH_KNOWN_HOSTS={known_hosts or sshd.known_hosts}
SSH_CONNECT_TIMEOUT=5
SSH_RETRIES=1
RAY_AUTH_TOKEN_PATH={directory / "auth_token"}
{extra}""")
    return conf


def ray_pids(temp_dir: Path) -> list[int]:
    """Pids of processes whose command line names this Ray temp dir (what `down` must end)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"{temp_dir}/" in args and state != "Z":
            found.append(int(entry))
    return found


def raylet_pid(temp_dir: Path) -> int:
    for pid in ray_pids(temp_dir):
        if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"/raylet"):
            return pid
    raise AssertionError(f"no raylet for {temp_dir}")


def kill_leftovers(path: Path) -> None:
    """SIGKILL any process still naming `path` (a failed test must not leave Ray running)."""
    for pid in ray_pids(path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
