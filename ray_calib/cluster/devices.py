"""devices.conf: the only parser of the cluster description (docs/design.md §7).

The seeds' file is shell `KEY=VALUE` with `#` comments and is accepted as it is. Extensions:

    <KEY>                      cluster-wide default (SSH_USER, DEVICE_KIND, DEVICES_PER_NODE, ...)
    HEAD_NODE_<FIELD>          the head node (seed keys: IP, IFNAME, SOURCE_FILENAME)
    WORKER_NODE_<FIELD>        worker 1 (seed keys); WORKER<N>_NODE_<FIELD> for worker N >= 2

Per-node fields override the cluster-wide default of the same name (DEVICES overrides DEVICES_PER_NODE).
Every problem is reported with its line number, all of them at once, so one `config check` is enough.
"""

from __future__ import annotations

import difflib
import getpass
import hashlib
import ipaddress
import json
import os
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

from ray_calib.errors import ConfigError

DEFAULT_CONF = "devices.conf"
DEVICE_KINDS = ("hpu", "cuda", "cpu")
# Ray resource each device kind is scheduled with. CPU nodes use "HPU": vLLM's CPU platform plugin in this
# project declares ray_device_key "HPU" (docs/design.md §9), a resource name Ray accepts as custom.
DEVICE_KEYS_BY_KIND = {"hpu": "HPU", "cuda": "GPU", "cpu": "HPU"}
# 107-byte AF_UNIX limit minus Ray's "/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store" (64 bytes).
MAX_RAY_TEMP_DIR_BYTES = 43

# Cluster-wide keys -> (kind, default). kind: str, int, path, size (bytes, with K/M/G suffix).
GLOBAL_KEYS: dict[str, tuple[str, object]] = {
    "RAY_CLUSTER_PORT": ("port", 6379),
    "RAY_DASHBOARD_PORT": ("port", 8265),
    "RAY_CLIENT_SERVER_PORT": ("port", 10001),
    "RAY_AUTH_TOKEN_PATH": ("str", "~/.ray/auth_token"),
    "INC_MEASURE_CONFIG_FILENAME": ("path", None),
    "INC_QUANT_CONFIG_FILENAME": ("path", None),
    "CALIBRATION_SAMPLE_LENGTH": ("int", None),
    "CALIBRATION_MAX_BATCH_SIZE": ("int", None),
    "WORK_DIR": ("str", None),
    "MIN_FREE_DISK_GB": ("int", 10),
    "TENSOR_PARALLEL_SIZE": ("int", None),
    "HEALTH_TIMEOUT": ("int", 120),
    "SSH_KNOWN_HOSTS": ("str", "~/.ssh/known_hosts"),
    "SSH_CONFIG": ("str", "~/.ssh/config"),
    "SSH_CONNECT_TIMEOUT": ("int", 10),
    "SSH_RETRIES": ("int", 2),
    "RAY_LISTEN_ALL_INTERFACES": ("int", 0),  # 1: let Ray's servers listen on 0.0.0.0 / :: (no bind shim)
}
# Per-node fields; those also allowed cluster-wide are defaults for every node.
NODE_FIELDS: dict[str, tuple[str, object]] = {
    "IP": ("ip", None),
    "IFNAME": ("str", None),
    "SOURCE_FILENAME": ("path", None),
    "SSH_HOST": ("str", None),
    "SSH_USER": ("str", None),
    "SSH_PORT": ("port", 22),
    "SSH_KEY": ("path", None),
    "DEVICE_KIND": ("kind", "hpu"),
    "DEVICES": ("int", 8),
    "PYTHON": ("str", "python3"),
    "RAY_TEMP_DIR": ("str", "/tmp/ray"),
    "RAY_NUM_CPUS": ("int", None),
    "RAY_MEMORY": ("size", None),
    "RAY_OBJECT_STORE_MEMORY": ("size", None),
}
NODE_DEFAULTABLE = {f for f in NODE_FIELDS if f not in ("IP", "IFNAME", "SOURCE_FILENAME", "SSH_HOST")}
_ALIASES = {"DEVICES_PER_NODE": "DEVICES"}
_NODE_KEY = re.compile(r"^(HEAD|WORKER([1-9]\d*)?)_NODE_([A-Z_]+)$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_SIZE = re.compile(r"^(\d+)([KMGT]?)B?$", re.IGNORECASE)
_T = TypeVar("_T")


class _Values(dict[str, object]):
    """Converted values by key; each kind of GLOBAL_KEYS/NODE_FIELDS converts to one type, read back here."""

    def number(self, key: str) -> int:
        return _typed(key, self[key], int)

    def text(self, key: str) -> str:
        return _typed(key, self[key], str)

    def maybe_number(self, key: str) -> int | None:
        return None if self[key] is None else self.number(key)

    def maybe_text(self, key: str) -> str | None:
        return None if self[key] is None else self.text(key)


def _typed(key: str, value: object, kind: type[_T]) -> _T:
    if not isinstance(value, kind):
        raise AssertionError(f"{key}: {value!r} is not a {kind.__name__}")
    return value


@dataclass(frozen=True)
class NodeConfig:
    name: str  # "head", "worker1", ...
    role: str  # "head" | "worker"
    ip: str
    ifname: str | None
    source_file: str | None  # absolute path, sourced before every command on the node
    ssh_host: str
    ssh_user: str
    ssh_port: int
    ssh_key: str | None
    device_kind: str
    devices: int
    python: str
    temp_dir: str
    num_cpus: int | None
    memory: int | None
    object_store_memory: int | None
    line: int  # where the node's IP is set, for messages
    # SSH_USER/SSH_PORT/SSH_KEY set in devices.conf: they win over ~/.ssh/config, as `ssh -l/-p/-i` would
    ssh_explicit: frozenset[str] = frozenset()

    @property
    def label(self) -> str:
        return f"{self.name} ({self.ip})"

    def ssh_command(self) -> str:
        """The command to try by hand when SSH fails."""
        key = f" -i {shlex.quote(self.ssh_key)}" if self.ssh_key else ""
        return f"ssh{key} -p {self.ssh_port} {self.ssh_user}@{self.ssh_host} true"


@dataclass(frozen=True)
class ClusterConfig:
    path: Path
    nodes: tuple[NodeConfig, ...]
    port: int
    dashboard_port: int
    client_server_port: int
    token_path: str
    work_dir: str
    min_free_disk_gb: int
    tensor_parallel_size: int
    health_timeout: int
    known_hosts: str
    connect_timeout: int
    retries: int
    ssh_config: str = ""  # OpenSSH client config read for every host (HostName, User, Port, IdentityFile, ProxyJump)
    listen_all: bool = False  # RAY_LISTEN_ALL_INTERFACES=1: Ray's wildcard ports are accepted (no bind shim)
    extras: dict[str, object] = field(default_factory=dict)  # INC_* and CALIBRATION_* for other stages

    @property
    def head(self) -> NodeConfig:
        return self.nodes[0]

    @property
    def workers(self) -> tuple[NodeConfig, ...]:
        return self.nodes[1:]

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{self.port}"

    def node(self, name: str) -> NodeConfig:
        return next(n for n in self.nodes if n.name == name)

    def fingerprint(self) -> str:
        """Hash of what Ray is started with (env files' content is hashed by `state`).

        Calibration keys, SSH settings and timeouts are left out: changing them needs no restart.
        """
        ray_inputs = ("nodes", "port", "dashboard_port", "client_server_port", "token_path", "work_dir", "listen_all")
        data = {k: v for k, v in asdict(self).items() if k in ray_inputs}
        data["nodes"] = [
            {k: v for k, v in node.items() if not k.startswith("ssh_") and k != "line"} for node in data["nodes"]
        ]
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class _Parsed:
    values: dict[str, str]
    lines: dict[str, int]
    problems: list[tuple[int, str]]


def default_conf_path() -> Path:
    return Path(os.environ.get("RAY_CALIB_DEVICES_CONF") or DEFAULT_CONF)


def load(path: str | os.PathLike | None = None) -> ClusterConfig:
    """Parse and validate devices.conf; raise one ConfigError listing every problem with its line."""
    path = Path(path) if path else default_conf_path()
    if not path.is_file():
        raise ConfigError(f"{path}: no such file", fix="pass --conf PATH or copy cluster/devices.conf.example")
    path = path.absolute()
    parsed = _read(path)
    config = _build(path, parsed)
    if parsed.problems:
        items = sorted(set(parsed.problems))
        shown = "; ".join(f"line {n}: {msg}" if n else msg for n, msg in items)
        raise ConfigError(f"{path}: {len(items)} problem(s): {shown}")
    assert config is not None
    return config


def _read(path: Path) -> _Parsed:
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
    problems: list[tuple[int, str]] = []
    try:
        text_lines = path.read_text().splitlines()
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})", fix="save it as UTF-8.") from None
    for number, raw in enumerate(text_lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("export "):
            text = text[len("export ") :].lstrip()
        key, eq, rest = text.partition("=")
        if not eq or not _NAME.match(key):
            problems.append((number, f"expected KEY=VALUE, got {raw.strip()!r}"))
            continue
        if rest[:1].isspace():
            problems.append((number, f"{key}: no spaces around '=' in shell syntax"))
            continue
        try:
            words = shlex.split(rest, comments=True)
        except ValueError as err:
            problems.append((number, f"{key}: {err} (unbalanced quotes?)"))
            continue
        if len(words) > 1:
            problems.append((number, f'{key}: value has spaces; quote it: {key}="{" ".join(words)}"'))
            continue
        value = words[0] if words else ""
        if not rest.lstrip().startswith("'"):
            value = _VAR.sub(lambda m: values.get(m[1] or m[2], os.environ.get(m[1] or m[2], "")), value)
        key = _canonical(key)
        if key in lines:
            problems.append((number, f"{key} set again (first set on line {lines[key]})"))
            continue
        values[key], lines[key] = value, number
    return _Parsed(values, lines, problems)


def _canonical(key: str) -> str:
    """WORKER1_NODE_X and WORKER_NODE_X name the same worker; DEVICES_PER_NODE is the default DEVICES."""
    m = _NODE_KEY.match(key)
    if m and m[1] == "WORKER1":
        return f"WORKER_NODE_{m[3]}"
    return _ALIASES.get(key, key)


def _build(path: Path, p: _Parsed) -> ClusterConfig | None:
    base = path.parent
    known = set(GLOBAL_KEYS) | NODE_DEFAULTABLE
    groups: dict[int, dict[str, str]] = {}
    for key in p.values:
        m = _NODE_KEY.match(key)
        if m:
            index = 0 if m[1] == "HEAD" else int(m[2] or 1)
            if m[3] not in NODE_FIELDS:
                _unknown(p, key, [f"{m[1]}_NODE_{f}" for f in NODE_FIELDS])
                continue
            groups.setdefault(index, {})[m[3]] = key
        elif key not in known:
            _unknown(p, key, sorted(known))
    cluster = _Values({k: _value(p, k, kind, default, base) for k, (kind, default) in GLOBAL_KEYS.items()})
    defaults = {f: _value(p, f, *NODE_FIELDS[f], base) for f in NODE_DEFAULTABLE}
    if 0 not in groups or "IP" not in groups[0]:
        p.problems.append((0, "HEAD_NODE_IP is missing (the head node's address)"))
        return None
    workers = sorted(i for i in groups if i)
    if workers and workers != list(range(1, len(workers) + 1)):
        first_gap = next(i for i in range(1, workers[-1] + 1) if i not in groups)
        line = min(p.lines[k] for k in groups[workers[-1]].values())
        p.problems.append((line, f"worker numbers must be consecutive: worker{first_gap} is missing"))
    built = [_node(p, i, groups[i], defaults, base) for i in sorted(groups)]
    nodes = [n for n in built if n is not None]
    if not nodes or nodes[0].role != "head":
        return None  # the head's problem is recorded; never promote a worker to head
    _check_duplicates(p, nodes)
    kinds = {n.device_kind for n in nodes}
    if len({DEVICE_KEYS_BY_KIND[k] for k in kinds}) > 1:
        p.problems.append((nodes[-1].line, f"nodes mix device kinds {sorted(kinds)}: one TP group needs one kind"))
    for key in ("INC_MEASURE_CONFIG_FILENAME", "INC_QUANT_CONFIG_FILENAME"):
        _check_file(p, key, cluster[key])
    total = sum(n.devices for n in nodes)
    tp_set = cluster.maybe_number("TENSOR_PARALLEL_SIZE")
    tp = tp_set or total
    if tp_set is not None and tp_set < 1:
        p.problems.append((p.lines["TENSOR_PARALLEL_SIZE"], "TENSOR_PARALLEL_SIZE must be >= 1"))
    if not cluster.text("RAY_AUTH_TOKEN_PATH").startswith(("/", "~")):
        p.problems.append(
            (
                p.lines["RAY_AUTH_TOKEN_PATH"],
                "RAY_AUTH_TOKEN_PATH: give an absolute path or ~/... "
                "(a relative one means a different file on every host)",
            )
        )
    if tp > total:
        p.problems.append((p.lines["TENSOR_PARALLEL_SIZE"], f"TENSOR_PARALLEL_SIZE: tp({tp}) > devices({total})"))
    extras = {k: cluster[k] for k in GLOBAL_KEYS if k.startswith(("INC_", "CALIBRATION_")) and cluster[k] is not None}
    return ClusterConfig(
        path=path,
        nodes=tuple(nodes),
        port=cluster.number("RAY_CLUSTER_PORT"),
        dashboard_port=cluster.number("RAY_DASHBOARD_PORT"),
        client_server_port=cluster.number("RAY_CLIENT_SERVER_PORT"),
        token_path=cluster.text("RAY_AUTH_TOKEN_PATH"),
        work_dir=cluster.maybe_text("WORK_DIR") or str(base),
        min_free_disk_gb=cluster.number("MIN_FREE_DISK_GB"),
        tensor_parallel_size=tp,
        health_timeout=cluster.number("HEALTH_TIMEOUT"),
        known_hosts=os.path.expanduser(cluster.text("SSH_KNOWN_HOSTS")),
        connect_timeout=cluster.number("SSH_CONNECT_TIMEOUT"),
        retries=cluster.number("SSH_RETRIES"),
        ssh_config=os.path.expanduser(cluster.text("SSH_CONFIG")),
        listen_all=bool(cluster.number("RAY_LISTEN_ALL_INTERFACES")),
        extras=extras,
    )


def _node(p: _Parsed, index: int, keys: dict[str, str], defaults: dict[str, object], base: Path) -> NodeConfig | None:
    name = "head" if index == 0 else f"worker{index}"
    prefix = "HEAD_NODE" if index == 0 else ("WORKER_NODE" if index == 1 else f"WORKER{index}_NODE")
    if "IP" not in keys:
        line = min(p.lines[k] for k in keys.values())
        p.problems.append((line, f"{prefix}_IP is missing ({name} has other keys)"))
        return None
    v = _Values(
        {
            f: _value(p, keys[f], *NODE_FIELDS[f], base) if f in keys else defaults.get(f, NODE_FIELDS[f][1])
            for f in NODE_FIELDS
        }
    )
    if v["IP"] is None:
        if p.values.get(keys["IP"]) == "":
            p.problems.append((p.lines[keys["IP"]], f"{keys['IP']} is empty (an unset $VARIABLE?)"))
        return None
    _check_file(p, keys.get("SOURCE_FILENAME"), v["SOURCE_FILENAME"])
    _check_line_endings(p, keys.get("SOURCE_FILENAME"), v["SOURCE_FILENAME"])
    key_name = keys.get("SSH_KEY") or ("SSH_KEY" if "SSH_KEY" in p.values else None)
    _check_file(p, key_name, v["SSH_KEY"])
    _check_temp_dir(p, keys.get("RAY_TEMP_DIR", "RAY_TEMP_DIR"), str(v["RAY_TEMP_DIR"]))
    devices = v.number("DEVICES")
    if devices < 1:
        p.problems.append((p.lines.get(keys.get("DEVICES", "DEVICES"), 0), f"{name}: DEVICES must be >= 1"))
    return NodeConfig(
        name=name,
        role="head" if index == 0 else "worker",
        ip=v.text("IP"),
        ifname=v.maybe_text("IFNAME"),
        source_file=v.maybe_text("SOURCE_FILENAME"),
        ssh_host=v.maybe_text("SSH_HOST") or v.text("IP"),
        ssh_user=v.maybe_text("SSH_USER") or getpass.getuser(),
        ssh_port=v.number("SSH_PORT"),
        ssh_key=v.maybe_text("SSH_KEY"),
        device_kind=v.text("DEVICE_KIND"),
        devices=devices,
        python=v.text("PYTHON"),
        temp_dir=os.path.normpath(v.text("RAY_TEMP_DIR")),
        num_cpus=v.maybe_number("RAY_NUM_CPUS"),
        memory=v.maybe_number("RAY_MEMORY"),
        object_store_memory=v.maybe_number("RAY_OBJECT_STORE_MEMORY"),
        line=p.lines[keys["IP"]],
        ssh_explicit=frozenset(f for f in ("SSH_USER", "SSH_PORT", "SSH_KEY") if f in keys or f in p.values),
    )


def _value(p: _Parsed, key: str, kind: str, default: object, base: Path) -> object:
    raw = p.values.get(key, "")
    if raw == "":
        return default
    line = p.lines[key]
    try:
        return _convert(raw, kind, base)
    except ValueError as err:
        p.problems.append((line, f"{key}={raw!r}: {err}"))
        return default


def _convert(raw: str, kind: str, base: Path) -> object:
    if kind == "str":
        return raw
    if kind == "path":
        return str((base / os.path.expanduser(raw)).absolute())
    if kind in ("int", "port"):
        if not raw.isdigit():
            raise ValueError("not a whole number")
        number = int(raw)
        if kind == "port" and not 1 <= number <= 65535:
            raise ValueError("port must be in 1..65535")
        return number
    if kind == "ip":
        try:
            return str(ipaddress.ip_address(raw))
        except ValueError:
            raise ValueError("not an IP address (hostnames resolving to loopback break gloo; give the IP)") from None
    if kind == "kind":
        if raw.lower() not in DEVICE_KINDS:
            raise ValueError(f"device kind must be one of {', '.join(DEVICE_KINDS)}")
        return raw.lower()
    if kind == "size":
        m = _SIZE.match(raw)
        if not m:
            raise ValueError("expected bytes, e.g. 1000000000 or 1G")
        return int(m[1]) * 1024 ** "BKMGT".index((m[2] or "B").upper())
    raise AssertionError(kind)


def _unknown(p: _Parsed, key: str, candidates: list[str]) -> None:
    near = difflib.get_close_matches(key, candidates, n=1)
    hint = f" (did you mean {near[0]}?)" if near else " (see cluster/devices.conf.example)"
    p.problems.append((p.lines[key], f"unknown key {key}{hint}"))


def _check_file(p: _Parsed, key: str | None, value: object) -> None:
    if key and value and not Path(str(value)).is_file():
        p.problems.append((p.lines[key], f"{key}: file not found: {value}"))


def _check_line_endings(p: _Parsed, key: str | None, value: object) -> None:
    """A shell sourcing a CRLF file keeps the \\r in every value it sets (VLLM_HOST_IP=1.2.3.4\\r)."""
    if not key or not value:
        return
    line = crlf_line(Path(str(value)))
    if line:
        p.problems.append(
            (
                p.lines[key],
                f"{key}: {value}:{line} ends in CR (Windows line endings), so every variable it sets "
                f"would end in \\r; convert it with: sed -i 's/\\r$//' {shlex.quote(str(value))}",
            )
        )


def crlf_line(path: Path) -> int | None:
    """First line of a text file with a carriage return in it, if any."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    at = data.find(b"\r")
    return None if at < 0 else data.count(b"\n", 0, at) + 1


def _check_temp_dir(p: _Parsed, key: str, temp_dir: str) -> None:
    """Ray puts AF_UNIX sockets at <dir>/session_<date>_<pid>/sockets/plasma_store: 107 bytes at most."""
    if len(os.path.normpath(temp_dir).encode()) > MAX_RAY_TEMP_DIR_BYTES:
        p.problems.append(
            (
                p.lines.get(key, 0),
                f"{key}: {temp_dir} is longer than {MAX_RAY_TEMP_DIR_BYTES} bytes, "
                "so Ray's socket paths under it exceed the 107-byte AF_UNIX limit; use a short dir "
                "such as /tmp/ray",
            )
        )


def _check_duplicates(p: _Parsed, nodes: list[NodeConfig]) -> None:
    seen: dict[str, NodeConfig] = {}
    boxes: dict[tuple[str, int, str], NodeConfig] = {}
    for node in nodes:
        if node.ip in seen:
            p.problems.append((node.line, f"{node.name} has the same IP {node.ip} as {seen[node.ip].name}"))
        seen.setdefault(node.ip, node)
        box = (node.ssh_host, node.ssh_port, node.temp_dir)
        if box in boxes and node.ip != boxes[box].ip:
            other = boxes[box]
            p.problems.append(
                (
                    node.line,
                    f"{node.name} and {other.name} share host {node.ssh_host} and Ray temp "
                    f"dir {node.temp_dir}; give one a RAY_TEMP_DIR of its own",
                )
            )
        boxes.setdefault(box, node)
