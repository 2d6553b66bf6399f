"""Rung c: one all-reduce across every node over the NIC devices.conf names (IFNAME), then (when the
cluster is up) the engine at the full TP over Ray (`ladder.ray_engine`).

One process per node, started over SSH with the node's Python after sourcing its env file (the env a rank
gets), joins a torch.distributed group at the head's IP: gloo on CPU nodes, HCCL on Gaudi (the scale-out
path: HCCL_SOCKET_IFNAME, and HCCL_OVER_OFI / libfabric when the env file sets them), with
GLOO_SOCKET_IFNAME / HCCL_SOCKET_IFNAME set to the node's IFNAME. Each adds rank + 1; every node must read
back world x (world + 1) / 2. A NIC that does not exist, does not route to the head, or a firewall shows up
here in seconds, naming the node, instead of as a hung engine start.
"""

from __future__ import annotations

import json
import random
import shlex

from ray_calib.cluster import devices
from ray_calib.cluster.devices import ClusterConfig, NodeConfig
from ray_calib.cluster.ray_nodes import node_prelude
from ray_calib.cluster.ssh import SSHRunner
from ray_calib.errors import ClusterError
from ray_calib.ladder.ray_engine import cluster_up, run_engine_over_ray
from ray_calib.ladder.run import LadderContext, RungFailed

JOIN_TIMEOUT_S = 60  # joining takes seconds; a node that cannot reach the store fails well before
_MARK = "@@ray-calib-allreduce@@"
_SCRIPT = r"""
import datetime, json, os, sys
rank, world, addr, port, backend, ifname, timeout, mark = sys.argv[1:9]
if ifname:
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ["HCCL_SOCKET_IFNAME"] = ifname
import torch
import torch.distributed as dist
device = "cpu"
if backend == "hccl":
    import habana_frameworks.torch.distributed.hccl  # noqa: F401  registers the backend
    device = "hpu"
dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=int(rank), world_size=int(world),
                        timeout=datetime.timedelta(seconds=int(timeout)))
value = torch.ones(1, device=device) * (int(rank) + 1)
dist.all_reduce(value)
print(mark + json.dumps({"sum": float(value.item()), "backend": backend}), flush=True)
dist.destroy_process_group()
"""


def run_allreduce(context: LadderContext) -> str:
    config = devices.load(context.conf)
    port = random.randint(20000, 29999)
    with SSHRunner(config, accept_new_host_keys=context.accept_new_host_keys) as runner:
        results = runner.map(config.nodes, lambda node: _rank(runner, config, node, port))
    evidence = judge(config, results)
    if not cluster_up(config):
        return f"{evidence}; the engine over Ray not run: {config.path.name}'s cluster is not up (`ray-calib up`)"
    return f"{evidence}; {run_engine_over_ray(context, config)}"


def backend_for(node: NodeConfig) -> str:
    return "hccl" if node.device_kind == "hpu" else "gloo"


def _rank(runner: SSHRunner, config: ClusterConfig, node: NodeConfig, port: int) -> dict:
    rank = config.nodes.index(node)
    args = [rank, len(config.nodes), config.head.ip, port, backend_for(node), node.ifname or "", JOIN_TIMEOUT_S, _MARK]
    script = f"{node_prelude(node)}\n{shlex.quote(node.python)} -c {shlex.quote(_SCRIPT)} " + " ".join(
        shlex.quote(str(a)) for a in args
    )
    result = runner.run(node, script, timeout=JOIN_TIMEOUT_S + 60, what="all-reduce")
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith(_MARK)), None)
    if result.rc == 124:
        raise ClusterError(node.label, f"did not finish the all-reduce within {JOIN_TIMEOUT_S + 60} s")
    if not result.ok or line is None:
        raise ClusterError(node.label, f"all-reduce failed: {_last_error(result.stderr or result.stdout)}")
    return json.loads(line[len(_MARK) :])


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    found = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
    return found[:300] or "no output"


def judge(config: ClusterConfig, results: dict) -> str:
    """Every node read back the sum of all ranks; the first that did not fails the rung, naming its NIC."""
    world = len(config.nodes)
    want = world * (world + 1) / 2
    # a node that failed by itself first: the others then only time out waiting for it
    waited = ("timeout", "timed out", "did not finish")
    for node in sorted(config.nodes, key=lambda n: any(w in str(results[n.name]).lower() for w in waited)):
        got = results[node.name]
        nic = f"IFNAME {node.ifname}" if node.ifname else "no IFNAME"
        if isinstance(got, ClusterError):
            raise RungFailed(
                node.label,
                f"{got.detail} ({backend_for(node)}, {nic}, head {config.head.ip})",
                fix=f"check that {node.ifname or 'the NIC'} exists on that node and reaches {config.head.ip} "
                "(firewall, routes; on Gaudi the scale-out ports and the env file's HCCL_OVER_OFI/libfabric).",
            )
        if got["sum"] != want:
            raise RungFailed(
                node.label, f"all-reduce gave {got['sum']}, not {want}", fix="check the collective backend."
            )
    backends = sorted({backend_for(n) for n in config.nodes})
    nics = ", ".join(f"{n.label} {n.ifname or '-'}" for n in config.nodes)
    return f"all-reduce of {world} nodes ({'/'.join(backends)}) gave {want:g} on each, over {nics}"
