"""Rung a: every node has what the head has, before any Ray process or engine starts.

Over SSH, with each node's own Python after sourcing its env file: `cluster.preflight` (Python, Ray, torch,
vLLM, INC, ray-calib and on Gaudi vllm-gaudi, the Habana plugin and the driver, equal to the head's; devices;
IFNAME; work dir and free disk), then this rung's own probe: the model at the same path with the same
config.json and shards, the host's available RAM and, on Gaudi, the free HBM per card from `hl-smi`.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from ray_calib.cluster import devices
from ray_calib.cluster.devices import NodeConfig
from ray_calib.cluster.preflight import HostReport, run_preflight
from ray_calib.cluster.ray_nodes import node_prelude
from ray_calib.cluster.ssh import SSHRunner
from ray_calib.errors import ClusterError
from ray_calib.ladder.run import LadderContext, RungFailed

_MARK = "@@ray-calib-ladder@@"
# runs on the node with its Python; only the standard library (the model digest is engine.nodes.model_digest's)
_PROBE = r"""
import hashlib, json, os, shutil, subprocess, sys
model, mark = sys.argv[1], sys.argv[2]
def digest(path):
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return None
    h = hashlib.sha256(open(config, "rb").read())
    for name in sorted(n for n in os.listdir(path) if n.endswith(".safetensors")):
        h.update(f"{name}:{os.path.getsize(os.path.join(path, name))};".encode())
    return h.hexdigest()[:16]
def mem_available():
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
def hbm_free():
    if not shutil.which("hl-smi"):
        return None
    out = subprocess.run(["hl-smi", "-Q", "memory.free", "-f", "csv,noheader,nounits"], capture_output=True,
                         text=True, timeout=60).stdout
    return [int(v.strip()) << 20 for v in out.split() if v.strip().isdigit()]
print(mark + json.dumps({"model": digest(model) if model else None, "mem_available": mem_available(),
                         "hbm_free": hbm_free()}))
"""


@dataclass(frozen=True)
class NodeModel:
    label: str
    digest: str | None  # None: no config.json at the path
    mem_available: int | None
    hbm_free: list[int] | None  # bytes per card (Gaudi)


def run_nodes(context: LadderContext) -> str:
    config = devices.load(context.conf)
    with SSHRunner(config, accept_new_host_keys=context.accept_new_host_keys) as runner:
        connected = runner.map(config.nodes, runner.connect)
        for node in config.nodes:
            if isinstance(connected[node.name], ClusterError):
                error = connected[node.name]
                raise RungFailed(node.label, f"ssh: {error.detail}", fix=error.fix or "check SSH to that host.")
        reports = run_preflight(runner)
        probed = runner.map(config.nodes, lambda node: _probe(runner, node, context))
    check_reports(reports)
    models = []
    for node in config.nodes:
        got = probed[node.name]
        if isinstance(got, ClusterError):
            raise RungFailed(node.label, got.detail, fix=got.fix or "check the node env file and PYTHON.")
        models.append(got)
    check_models(models, str(context.model) if context.model else None)
    memory = check_memory(models)
    head = reports[0].facts
    versions = ", ".join(f"{k} {v}" for k, v in sorted(head["packages"].items()) if v)
    model = f"; model {models[0].digest} everywhere" if context.model else "; no model given"
    return f"{len(config.nodes)} nodes like the head (python {head['python']}, {versions}); {memory}{model}"


def _probe(runner: SSHRunner, node: NodeConfig, context: LadderContext) -> NodeModel:
    model = str(context.model) if context.model else ""
    script = f"{node_prelude(node)}\n{shlex.quote(node.python)} -c {shlex.quote(_PROBE)} {shlex.quote(model)} {_MARK}"
    result = runner.run(node, script, timeout=120, what="ladder probe")
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith(_MARK)), None)
    if not result.ok or line is None:
        raise ClusterError(node.label, f"ladder probe failed: {result.tail()}", fix="check PYTHON and the node env.")
    facts = json.loads(line[len(_MARK) :])
    return NodeModel(node.label, facts["model"], facts["mem_available"], facts["hbm_free"])


def check_reports(reports: list[HostReport]) -> None:
    """The first host whose preflight found a problem (version skew, devices, IFNAME, disk) fails the rung."""
    for report in reports:
        if not report.ok:
            raise RungFailed(
                report.node.label,
                report.verdict,
                fix="install the head's versions on that host (one identical stack everywhere), "
                "or fix the device/IFNAME/work dir named, then rerun the ladder.",
            )


def check_models(models: list[NodeModel], model: str | None) -> None:
    """Same model on every node (config.json and shard names and sizes), as the head has it."""
    if model is None:
        return
    head = models[0]
    for node in models:
        if node.digest is None:
            raise RungFailed(
                node.label,
                f"no config.json under {model}",
                fix="put the model at the same path on every node (or on a shared file system).",
            )
        if node.digest != head.digest:
            raise RungFailed(
                node.label,
                f"{model} differs from the head's copy (config.json or shard sizes: {node.digest} != {head.digest})",
                fix=f"copy the head's {model} to that node.",
            )


BUSY_CARD = 0.9  # a card with less free HBM than this share of the freest card is held by another process


def check_memory(models: list[NodeModel]) -> str:
    """Gaudi: every card about as free as the freest (a card held by another process fails a rank's start)."""
    cards = [(node.label, i, free) for node in models for i, free in enumerate(node.hbm_free or [])]
    if cards:
        most = max(free for _, _, free in cards)
        for label, index, free in cards:
            if free < BUSY_CARD * most:
                raise RungFailed(
                    label,
                    f"card {index} has {free / 2**30:.1f} GiB HBM free, the freest card {most / 2**30:.1f} GiB",
                    fix="stop the process holding that card (`hl-smi` lists it), then rerun the ladder.",
                )
    ram = [node.mem_available for node in models if node.mem_available is not None]
    hbm = f", HBM free >= {min(f for _, _, f in cards) / 2**30:.0f} GiB per card" if cards else ""
    return f"RAM available >= {min(ram) / 2**30:.0f} GiB per node{hbm}" if ram else hbm.lstrip(", ")
