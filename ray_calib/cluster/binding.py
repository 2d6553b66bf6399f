"""Does Ray run where devices.conf says? The last check of `up`, on every node, over SSH.

Ray can pick another address than the one it was given: `ray start --node-ip-address 127.0.0.1` is
replaced by the host's primary address, and on a host with several NICs a wrong one is the classic
"ranks cannot reach each other" failure. After the nodes are alive, a probe lists the node's Ray
processes (those of its RAY_TEMP_DIR) with their `--node-ip-address`/`--gcs-address` flags, the
raylet's environment (VLLM_HOST_IP, *_SOCKET_IFNAME) and every TCP port they listen on, plus the
addresses of the node's interfaces. `problems` compares that with the configuration:

    address      the address the GCS knows the node by, and every Ray process's node IP, equal the
                 configured IP; on the head the GCS address equals HEAD_NODE_IP:RAY_CLUSTER_PORT
    node env     VLLM_HOST_IP is the configured IP; every *_SOCKET_IFNAME is IFNAME, which holds that IP
    listening    every listening port is on the configured IP or loopback, never a wildcard (0.0.0.0, ::)

A node failing any of them stops `up` (Ray is stopped again) with the node, what Ray chose, what was
configured and the fix.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
from dataclasses import dataclass, field

from ray_calib.cluster.devices import ClusterConfig, NodeConfig
from ray_calib.cluster.ray_nodes import PROC_TABLE, SOCKET_IFNAME_VARS

_MARK = "@@ray-calib-binding@@"
WILDCARDS = ("0.0.0.0", "::")

# stdlib only (any python3 on the node): processes of the temp dir and their children, their flags,
# the raylet's env, listening sockets from /proc/net/tcp{,6} matched to each process's socket inodes.
_PROBE = (
    r"""
import json, os, socket, struct, subprocess, sys
temp, mark = sys.argv[1].rstrip("/"), sys.argv[2]
"""
    + PROC_TABLE
    + r"""
def mine(args):
    return any(f"{temp}/session_" in a or a == f"--temp-dir={temp}" for a in args)
chosen = with_children({p for p, (_, args) in procs.items() if mine(args)})
def listening():
    found = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            lines = open(f"/proc/net/{name}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            hexip, hexport = f[1].split(":")
            raw = bytes.fromhex(hexip)
            if family == socket.AF_INET:
                ip = socket.inet_ntop(family, raw[::-1])
            else:
                ip = socket.inet_ntop(family, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            found[f[9]] = (ip, int(hexport, 16))
    return found
sockets = listening()
def ports(pid):
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in sockets:
                out.add(sockets[link[8:-1]])
    except OSError:
        pass
    return sorted(out)
def env(pid):
    try:
        raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return {}
    items = dict(i.decode(errors="replace").split("=", 1) for i in raw if b"=" in i)
    return {k: v for k, v in items.items() if k == "VLLM_HOST_IP" or k.endswith("_SOCKET_IFNAME")}
def flags(args):
    keep = ("--node-ip-address", "--node_ip_address", "--gcs-address", "--gcs_address", "--gcs_server_port")
    found = {}
    for i, a in enumerate(args):
        for k in keep:
            if a.startswith(k + "="):
                found[k.replace("_", "-")] = a.split("=", 1)[1]
            elif a == k and i + 1 < len(args):
                found[k.replace("_", "-")] = args[i + 1]
    return found
def name(args):
    first = args[0] if args else "?"
    if first.startswith("ray::"):
        return first.split()[0]
    base = os.path.basename(first.split()[0])
    if base.startswith("python") and len(args) > 1:
        script = next((a for a in args[1:] if not a.startswith("-")), "")
        return os.path.basename(script) or base
    return base
def ifaces():
    out = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[2] in ("inet", "inet6"):
            found.setdefault(parts[1], []).append(parts[3])
    return found
rows = []
for pid in sorted(chosen):
    args = procs[pid][1]
    rows.append({"pid": pid, "name": name(args), "flags": flags(args), "listen": ports(pid),
                 "env": env(pid) if name(args) == "raylet" else {}})
print(mark + json.dumps({"processes": rows, "ifaces": ifaces()}))
"""
)


def probe_script(node: NodeConfig) -> str:
    args = " ".join(shlex.quote(a) for a in (node.temp_dir, _MARK))
    return f"{shlex.quote(node.python)} -c {shlex.quote(_PROBE)} {args} || python3 -c {shlex.quote(_PROBE)} {args}"


def parse(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK) :])
    raise ValueError("no probe output")


@dataclass
class Binding:
    """What one node runs on, and what is wrong with it (empty when it is where it was told)."""

    node: NodeConfig
    ray_ip: str  # the address the GCS knows the node by
    problems: list[str] = field(default_factory=list)
    listening: list[str] = field(default_factory=list)  # "name ip:port" of every listening socket


def _same(a: str, b: str) -> bool:
    try:
        x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return a == b
    mapped = [getattr(v, "ipv4_mapped", None) or v for v in (x, y)]
    return mapped[0] == mapped[1]


def _allowed(ip: str, node_ip: str) -> bool:
    if _same(ip, node_ip):
        return True
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    addr = getattr(addr, "ipv4_mapped", None) or addr
    return addr.is_loopback and not addr.is_unspecified and str(addr) in ("127.0.0.1", "::1")


def _holds(ifaces: dict[str, list[str]], ifname: str, ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    for cidr in ifaces.get(ifname, []):
        iface = ipaddress.ip_interface(cidr)
        if iface.ip == addr or (addr.is_loopback and addr in iface.network):
            return True
    return False


def problems(node: NodeConfig, config: ClusterConfig, facts: dict, ray_ip: str, *, listening: bool = True) -> Binding:
    """Compare one node's probe (`facts`) and its GCS address (`ray_ip`) with devices.conf; `listening`
    also refuses ports on other addresses than the node's IP and loopback."""
    found = Binding(node, ray_ip)
    procs = facts.get("processes", [])
    chosen = {ray_ip} if ray_ip and not _same(ray_ip, node.ip) else set()
    for proc in procs:
        ip = proc["flags"].get("--node-ip-address")
        if ip and not _same(ip, node.ip):
            chosen.add(ip)
    if chosen:
        found.ray_ip = sorted(chosen)[0]
        found.problems.append(f"Ray runs it on {', '.join(sorted(chosen))}, not the configured {node.ip}")
    if node.role == "head":
        gcs = [p for p in procs if p["name"] == "gcs_server"]
        if not gcs:
            found.problems.append("no gcs_server process of this node's Ray")
        for proc in procs:
            address = proc["flags"].get("--gcs-address")
            if address and address != config.address:
                found.problems.append(f"{proc['name']} uses GCS {address}, not {config.address}")
                break
    raylets = [p for p in procs if p["name"] == "raylet"]
    if not raylets:
        found.problems.append("no raylet process of this node's Ray")
    for raylet in raylets[:1]:
        found.problems += _env_problems(node, raylet["env"], facts.get("ifaces", {}))
    for proc in procs:
        for ip, port in proc["listen"]:
            found.listening.append(f"{proc['name']} {ip}:{port}")
            if listening and not _allowed(ip, node.ip):
                where = "all interfaces" if ip in WILDCARDS else "another address"
                found.problems.append(f"{proc['name']} listens on {ip}:{port} ({where})")
    return found


def _env_problems(node: NodeConfig, env: dict[str, str], ifaces: dict[str, list[str]]) -> list[str]:
    out = []
    host_ip = env.get("VLLM_HOST_IP")
    if host_ip != node.ip:
        out.append(f"VLLM_HOST_IP is {host_ip or 'unset'}, not {node.ip}")
    for var in SOCKET_IFNAME_VARS[node.device_kind]:
        value = env.get(var)
        if node.ifname and value != node.ifname:
            out.append(f"{var} is {value or 'unset'}, not IFNAME {node.ifname}")
        elif value and not _holds(ifaces, value, node.ip):
            out.append(f"{var}={value} does not hold {node.ip}")
    return out


def ip_key(node: NodeConfig) -> str:
    """The devices.conf key of the node's IP."""
    if node.role == "head":
        return "HEAD_NODE_IP"
    index = node.name.removeprefix("worker")
    return "WORKER_NODE_IP" if index == "1" else f"WORKER{index}_NODE_IP"


def fix(binding: Binding) -> str:
    node = binding.node
    if node.ip in ("127.0.0.1", "::1"):
        return (
            f"Ray replaces {node.ip} with the host's primary address: set {ip_key(node)} to another address of "
            "that host (the NIC the other nodes reach; on one box e.g. 127.0.0.3), then `ray-calib up --restart`"
        )
    if all("listens on" in p for p in binding.problems):
        return (
            f"a process of Ray on {node.ssh_host} bound a port outside the bind shim (is LD_PRELOAD reset by its "
            "env file?); fix that, or set RAY_LISTEN_ALL_INTERFACES=1 in devices.conf to accept it, then "
            "`ray-calib up --restart`"
        )
    return (
        f"check that {node.ip} is an address of {node.ifname or 'a NIC'} on {node.ssh_host} and that its env "
        "file sets no RAY_NODE_IP_ADDRESS, VLLM_HOST_IP or *_SOCKET_IFNAME of its own, then `ray-calib up --restart`"
    )
