"""Every remote command goes through `SSHRunner`: paramiko, host keys verified, (rc, stdout, stderr).

Host keys are checked against known_hosts: an unknown key is refused (naming the host and the
fingerprint) unless `accept_new_host_keys` records it; a changed key is always refused. Only key
authentication is used and nothing secret is logged: the token travels by SFTP, never on a command line.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shlex
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ray_calib.cluster.devices import ClusterConfig, NodeConfig
from ray_calib.errors import ClusterError

if TYPE_CHECKING:  # paramiko is imported when the first connection is made
    import paramiko

log = logging.getLogger(__name__)
T = TypeVar("T")
_KNOWN_HOSTS_LOCK = threading.Lock()


class _Retry(Exception):
    """A network failure before the SSH handshake: worth another attempt."""


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def tail(self, lines: int = 3) -> str:
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return " | ".join(text[-lines:]) or f"exit code {self.rc}"


def fingerprint(key) -> str:
    """OpenSSH-style SHA256 fingerprint, the form `ssh-keygen -lf` prints."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


@dataclass(frozen=True)
class Target:
    """Where and how to log in to one host, after ~/.ssh/config (what `ssh -G HOST` would print)."""

    hostname: str
    port: int
    user: str
    key_filenames: tuple[str, ...] = ()
    proxy_jump: str | None = None
    proxy_command: str | None = None

    @property
    def host_entry(self) -> str:
        """The host's name in known_hosts."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


def _lookup(ssh_config: str, host: str) -> dict:
    import paramiko

    if not ssh_config or not os.path.isfile(ssh_config):
        return {}
    try:
        return dict(paramiko.SSHConfig.from_path(ssh_config).lookup(host))
    except (paramiko.SSHException, ValueError) as err:
        raise ClusterError(
            host,
            f"cannot read SSH config {ssh_config}: {err}",
            fix="fix that file (check it with: ssh -G HOST), or point SSH_CONFIG elsewhere",
        ) from None


def resolve(node: NodeConfig, ssh_config: str) -> Target:
    """The node's SSH target: devices.conf's SSH_HOST (or IP) looked up in the OpenSSH client config.

    SSH_USER, SSH_PORT and SSH_KEY given in devices.conf win over the config, as `ssh -l/-p/-i` do.
    """
    found = _lookup(ssh_config, node.ssh_host)
    explicit = node.ssh_explicit
    keys = (node.ssh_key,) if "SSH_KEY" in explicit or not found.get("identityfile") else ()
    if not keys:
        keys = tuple(os.path.expanduser(k) for k in found["identityfile"] if os.path.isfile(os.path.expanduser(k)))
    jump = found.get("proxyjump")
    return Target(
        hostname=found.get("hostname", node.ssh_host),
        port=node.ssh_port if "SSH_PORT" in explicit or "port" not in found else int(found["port"]),
        user=node.ssh_user if "SSH_USER" in explicit or "user" not in found else found["user"],
        key_filenames=tuple(k for k in keys if k),
        proxy_jump=None if jump in (None, "none") else jump,
        proxy_command=None if found.get("proxycommand") in (None, "none") else found["proxycommand"],
    )


def _jump_target(spec: str, ssh_config: str, default_user: str) -> Target:
    """One ProxyJump hop, `[user@]host[:port]`, itself looked up in the SSH config."""
    user, _, hostport = spec.rpartition("@")
    host, _, port = hostport.partition(":")
    found = _lookup(ssh_config, host)
    keys = tuple(os.path.expanduser(k) for k in found.get("identityfile", []) if os.path.isfile(os.path.expanduser(k)))
    return Target(
        hostname=found.get("hostname", host),
        port=int(port or found.get("port", 22)),
        user=user or found.get("user", default_user),
        key_filenames=keys,
        proxy_jump=None if found.get("proxyjump") in (None, "none") else found["proxyjump"],
    )


def _host_key_policy(node: NodeConfig, target: Target, known_hosts: str, accept_new: bool):
    import paramiko

    class Policy(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key) -> None:
            fp = fingerprint(key)
            if not accept_new:
                raise ClusterError(
                    node.label,
                    f"unknown SSH host key {key.get_name()} {fp} for {target.host_entry} (not in {known_hosts})",
                    fix="check the fingerprint with the host's admin, then rerun with --accept-new-host-keys",
                )
            line = f"{target.host_entry} {key.get_name()} {key.get_base64()}\n"
            with _KNOWN_HOSTS_LOCK:
                Path(known_hosts).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                with open(known_hosts, "a") as handle:
                    handle.write(line)
            client.get_host_keys().add(hostname, key.get_name(), key)
            log.warning("%s: recorded new host key %s %s in %s", node.label, key.get_name(), fp, known_hosts)

    return Policy()


class SSHRunner:
    """One SSH connection per node, opened on first use, reused, and closed by `close()`."""

    def __init__(
        self, config: ClusterConfig, *, accept_new_host_keys: bool = False, log_dir: Path | None = None
    ) -> None:
        self.config = config
        self.accept_new = accept_new_host_keys
        self.log_dir = log_dir
        self._clients: dict[str, paramiko.SSHClient] = {}
        self._jumps: list[paramiko.SSHClient] = []  # connections to ProxyJump hosts, closed with the rest
        self._lock = threading.Lock()

    def __enter__(self) -> SSHRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
            jumps, self._jumps = self._jumps, []
        for client in clients + jumps[::-1]:
            client.close()

    def log_path(self, node: NodeConfig) -> Path | None:
        return self.log_dir / f"{node.name}.log" if self.log_dir else None

    def connect(self, node: NodeConfig):
        """Open (or reuse) the connection; retry network errors, never auth or host-key errors."""
        with self._lock:
            if node.name in self._clients:
                return self._clients[node.name]
        client = self._open(node)
        with self._lock:
            self._clients[node.name] = client
        return client

    def _open(self, node: NodeConfig):
        target = resolve(node, self.config.ssh_config)
        attempts = self.config.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return self._login(node, target, self._socket(node, target))
            except _Retry as err:
                if attempt == attempts:
                    raise ClusterError(
                        node.label,
                        f"cannot reach sshd at {target.hostname}:{target.port} after "
                        f"{attempts} attempt(s): {err.__cause__}",
                        fix=f"check the host and port; try: {node.ssh_command()}",
                    ) from None
                time.sleep(min(2.0, 0.5 * attempt))
        raise AssertionError("unreachable")

    def _socket(self, node: NodeConfig, target: Target):
        """The ProxyJump channel or ProxyCommand pipe to the host, or None for a direct TCP connection."""
        import paramiko

        if target.proxy_command:
            return paramiko.ProxyCommand(
                target.proxy_command.replace("%h", target.hostname)
                .replace("%p", str(target.port))
                .replace("%r", target.user)
            )
        if not target.proxy_jump:
            return None
        # Hops are comma-separated, first hop first; each verifies its own host key the same way.
        sock = None
        hops = [_jump_target(h.strip(), self.config.ssh_config, node.ssh_user) for h in target.proxy_jump.split(",")]
        for index, hop in enumerate(hops):
            client = self._login(node, hop, sock, via=f" via jump host {hop.hostname}")
            self._jumps.append(client)
            nxt = hops[index + 1] if index + 1 < len(hops) else target
            try:
                sock = client.get_transport().open_channel("direct-tcpip", (nxt.hostname, nxt.port), ("", 0))
            except paramiko.SSHException as err:
                raise ClusterError(
                    node.label,
                    f"jump host {hop.hostname} cannot reach {nxt.hostname}:{nxt.port} ({err})",
                    fix="check ProxyJump in your SSH config",
                ) from None
        return sock

    def _login(self, node: NodeConfig, target: Target, sock, via: str = ""):
        import paramiko

        client = paramiko.SSHClient()
        if os.path.isfile(self.config.known_hosts):
            client.load_host_keys(self.config.known_hosts)
        client.set_missing_host_key_policy(_host_key_policy(node, target, self.config.known_hosts, self.accept_new))
        keys = list(target.key_filenames) or None
        try:
            client.connect(
                target.hostname,
                port=target.port,
                username=target.user,
                sock=sock,
                key_filename=keys,
                look_for_keys=keys is None,
                allow_agent=keys is None,
                timeout=self.config.connect_timeout,
                banner_timeout=self.config.connect_timeout,
                auth_timeout=self.config.connect_timeout,
            )
            return client
        except paramiko.BadHostKeyException as err:
            client.close()
            raise ClusterError(
                node.label,
                f"SSH host key CHANGED for {target.host_entry}{via}: got {fingerprint(err.key)}, "
                f"known_hosts has {fingerprint(err.expected_key)} (possible man-in-the-middle)",
                fix=f"if the host was reinstalled: ssh-keygen -R '{target.host_entry}' -f "
                f"{self.config.known_hosts}, then rerun with --accept-new-host-keys",
            ) from None
        except ClusterError:
            client.close()
            raise
        except (TimeoutError, OSError, EOFError, paramiko.SSHException) as err:  # EOF: closed mid-handshake
            # After a completed handshake the failure is the login (wrong or unreadable key, e.g. a .pub
            # file): say so at once; only network failures are retried.
            handshake_done = client.get_transport() is not None and client.get_transport().is_active()
            client.close()
            if isinstance(err, paramiko.AuthenticationException) or handshake_done:
                key = ", ".join(target.key_filenames) or "your default keys/agent"
                raise ClusterError(
                    node.label,
                    f"SSH authentication failed for {target.user}@{target.hostname}{via} with {key} ({err})",
                    fix=f"give SSH_KEY a private key authorised there "
                    f"(ssh-copy-id) and check by hand: "
                    f"{node.ssh_command()}",
                ) from None
            raise _Retry() from err

    def run(self, node: NodeConfig, script: str, *, timeout: float = 300, what: str = "") -> Result:
        """Run `script` with bash on the node; rc 124 when it outlives `timeout` seconds."""
        import paramiko

        client = self.connect(node)
        try:
            channel = client.get_transport().open_session()
            channel.settimeout(1.0)
            channel.exec_command(f"bash -c {shlex.quote(script)}")
        except paramiko.SSHException as refused:
            raise ClusterError(
                node.label,
                f"SSH session refused ({refused})",
                fix=f"check sshd on that host; try: {node.ssh_command()}",
            ) from None
        out, err = bytearray(), bytearray()
        began = time.monotonic()
        deadline = began + timeout
        rc = None
        while rc is None:
            drained = False
            while channel.recv_ready():
                out += channel.recv(65536)
                drained = True
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(65536)
                drained = True
            if channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready():
                rc = channel.recv_exit_status()
            elif time.monotonic() > deadline:
                rc = 124
                err += f"\n[ray-calib] timed out after {timeout:.0f} s\n".encode()
            elif not drained:
                time.sleep(0.02)
        channel.close()
        result = Result(rc, out.decode(errors="replace"), err.decode(errors="replace"))
        self._log(node, what or script.splitlines()[-1][:200], result, time.monotonic() - began)
        return result

    def put(self, node: NodeConfig, data: bytes, remote_path: str, *, mode: int = 0o600) -> None:
        """Write `data` to `remote_path` over SFTP: created with `mode`, then renamed into place."""
        import paramiko

        try:
            sftp = self.connect(node).open_sftp()
        except paramiko.SSHException as err:
            raise ClusterError(
                node.label, f"SFTP refused ({err})", fix="enable the sftp subsystem in that host's sshd_config"
            ) from None
        try:
            path = remote_path
            if path.startswith("~/"):
                path = sftp.normalize(".") + path[1:]
            parent = os.path.dirname(path)
            self._mkdirs(sftp, parent)
            tmp = f"{path}.{node.name}.{os.getpid()}.ray-calib-tmp"  # two nodes may share one host and home
            with sftp.open(tmp, "wb") as handle:
                handle.chmod(mode)
                handle.write(data)
            sftp.posix_rename(tmp, path)
        except OSError as err:  # paramiko's SFTP errors are IOErrors, often without an errno
            raise ClusterError(
                node.label,
                f"cannot write {remote_path} over SFTP ({err or type(err).__name__})",
                fix="check that the directory is writable for the SSH user there",
            ) from None
        finally:
            sftp.close()
        self._log(node, f"sftp put {remote_path} (mode {mode:o}, {len(data)} bytes)", Result(0, "", ""))

    @staticmethod
    def _mkdirs(sftp, path: str) -> None:
        parts, probe = [], path
        while probe not in ("", "/"):
            try:
                sftp.stat(probe)
                break
            except FileNotFoundError:
                parts.append(probe)
                probe = os.path.dirname(probe)
        for part in reversed(parts):
            sftp.mkdir(part, mode=0o700)

    def map(self, nodes: Iterable[NodeConfig], fn: Callable[[NodeConfig], T]) -> dict[str, T | ClusterError]:
        """Run `fn(node)` on every node in parallel; a node's ClusterError is its result, not a crash."""
        nodes = list(nodes)

        def guarded(node: NodeConfig) -> T | ClusterError:
            try:
                return fn(node)
            except ClusterError as err:
                self._log(node, "error", Result(1, "", str(err)))
                return err

        with ThreadPoolExecutor(max_workers=max(1, min(16, len(nodes)))) as pool:
            return dict(zip([n.name for n in nodes], pool.map(guarded, nodes)))

    def _log(self, node: NodeConfig, what: str, result: Result, seconds: float = 0.0) -> None:
        path = self.log_path(node)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(path, "a") as handle:
            handle.write(f"--- {time.strftime('%H:%M:%S')} {what} -> rc {result.rc} ({seconds:.1f} s)\n")
            for chunk in (result.stdout, result.stderr):
                if chunk.strip():
                    handle.write(chunk if chunk.endswith("\n") else chunk + "\n")
