"""What runs on a node: its environment, `ray start` for head and workers, and a scoped stop.

The node env is fixed when Ray starts (raylets hand it to every worker they spawn), so it is built here
once: the sourced env file first, then VLLM_HOST_IP, the socket IFNAME variables and token auth on top.

Why not plain `ray stop`: it kills every Ray process of the machine, including other clusters sharing
it (and the second node when two nodes live on one box). `stop_script` ends only the processes of
this node's Ray temp dir (plus the head's client server on this cluster's port) and their children,
raylet first and GCS last, as `ray stop` orders them.
"""

from __future__ import annotations

import json
import shlex

from ray_calib.cluster.bindshim import preload_lines
from ray_calib.cluster.devices import DEVICE_KEYS_BY_KIND, ClusterConfig, NodeConfig

LABEL_KEY = "ray-calib/node"
DEVICE_KEYS = DEVICE_KEYS_BY_KIND
SOCKET_IFNAME_VARS = {
    "hpu": ("GLOO_SOCKET_IFNAME", "HCCL_SOCKET_IFNAME"),
    "cuda": ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"),
    "cpu": ("GLOO_SOCKET_IFNAME",),
}


def shell_path(path: str) -> str:
    """Quote a path for bash, keeping a leading ~ meaning the remote user's home."""
    if path == "~" or path.startswith("~/"):
        return '"$HOME"' + shlex.quote(path[1:]) if len(path) > 1 else '"$HOME"'
    return shlex.quote(path)


def node_env(node: NodeConfig, token_path: str) -> dict[str, str]:
    """Variables exported after the env file; values are shell words (token path may use $HOME)."""
    env = {
        "VLLM_HOST_IP": shlex.quote(node.ip),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": shell_path(token_path),
    }
    if node.ifname:
        env.update({var: shlex.quote(node.ifname) for var in SOCKET_IFNAME_VARS[node.device_kind]})
    return env


def node_prelude(node: NodeConfig, token_path: str = "~/.ray/auth_token") -> str:
    lines = []
    if node.source_file:
        quoted = shlex.quote(node.source_file)
        lines.append(
            f"if [ -f {quoted} ]; then :; else echo 'node env file {node.source_file} "
            f"not found on this host' >&2; exit 97; fi"
        )
        # Sourced CRLF lines would leave a \r at the end of every value they set.
        lines.append(
            f"if grep -q \"$(printf '\\r')\" {quoted}; then echo 'node env file {node.source_file} has "
            f"Windows line endings (CR) on this host; convert it with dos2unix' >&2; "
            f"exit 97; fi"
        )
        lines.append(f". {quoted}")
    lines += [f"export {k}={v}" for k, v in node_env(node, token_path).items()]
    return "\n".join(lines)


def start_args(node: NodeConfig, config: ClusterConfig) -> list[str]:
    args = [
        "start",
        "--node-ip-address",
        node.ip,
        "--temp-dir",
        node.temp_dir,
        "--disable-usage-stats",
        "--labels",
        f"{LABEL_KEY}={node.name}",
    ]
    if node.role == "head":
        args += [
            "--head",
            "--port",
            str(config.port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(config.dashboard_port),
            "--ray-client-server-port",
            str(config.client_server_port),
        ]
    else:
        args += ["--address", config.address]
    key = DEVICE_KEYS[node.device_kind]
    if key == "GPU":
        args += ["--num-gpus", str(node.devices)]
    else:
        args += ["--resources", json.dumps({key: node.devices})]
    for flag, value in (
        ("--num-cpus", node.num_cpus),
        ("--memory", node.memory),
        ("--object-store-memory", node.object_store_memory),
    ):
        if value is not None:
            args += [flag, str(value)]
    return args


def start_script(node: NodeConfig, config: ClusterConfig) -> str:
    """Start Ray on the node with the node env, from the work directory (old Ray stopped before); its
    servers listen on the node's IP through `bindshim` unless RAY_LISTEN_ALL_INTERFACES=1."""
    ray = " ".join(shlex.quote(a) for a in start_args(node, config))
    return "\n".join(
        [
            node_prelude(node, config.token_path),
            *([] if config.listen_all else preload_lines(node)),
            f"cd {shlex.quote(config.work_dir)}",
            f"exec {shlex.quote(node.python)} -m ray.scripts.scripts {ray} </dev/null",
        ]
    )


# The node's process table (pid -> (ppid, args), zombies left out) and a closure over children: shared by the
# stop script below and `binding`'s probe, both run by any python3 on the node (stdlib only).
PROC_TABLE = r"""
procs = {}
for entry in os.listdir("/proc"):
    if not entry.isdigit():
        continue
    try:
        args = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace").split("\0")
        stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        continue
    if stat[0] != "Z":
        procs[int(entry)] = (int(stat[1]), [a for a in args if a])
def with_children(chosen):
    grew = True
    while grew:
        more = {p for p, (ppid, _) in procs.items() if ppid in chosen} - chosen
        grew, chosen = bool(more), chosen | more
    return chosen
"""

_STOP = (
    r"""
import json, os, signal, sys, time
temp, port, me = sys.argv[1].rstrip("/"), sys.argv[2], os.getpid()
"""
    + PROC_TABLE
    + r"""
def mine(args):
    if any(f"{temp}/session_" in a or a == f"--temp-dir={temp}" for a in args):
        return True
    return port != "-" and "ray.util.client.server" in args and f"--port={port}" in args
chosen = with_children({pid for pid, (_, args) in procs.items() if mine(args)})
chosen.discard(me)
def kind(pid):
    exe = os.path.basename(procs[pid][1][0]) if procs[pid][1] else ""
    return 0 if exe == "raylet" else 2 if exe == "gcs_server" else 1
def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
for stage in (0, 1, 2):
    group = [p for p in chosen if kind(p) == stage]
    for pid in group:
        try: os.kill(pid, signal.SIGTERM)
        except OSError: pass
    deadline = time.time() + 5
    while any(alive(p) for p in group) and time.time() < deadline:
        time.sleep(0.05)
    for pid in group:
        if alive(pid):
            try: os.kill(pid, signal.SIGKILL)
            except OSError: pass
print(json.dumps({"stopped": len(chosen)}))
"""
)


def stop_script(node: NodeConfig, config: ClusterConfig) -> str:
    """Shell lines ending this node's Ray processes (any python3 will do: the probe uses stdlib only)."""
    port = str(config.client_server_port) if node.role == "head" else "-"
    args = " ".join(shlex.quote(a) for a in (node.temp_dir, port))
    return f"{shlex.quote(node.python)} -c {shlex.quote(_STOP)} {args} || python3 -c {shlex.quote(_STOP)} {args}"


def ray_log_dir(node: NodeConfig) -> str:
    return f"{node.temp_dir}/session_latest/logs"
