"""What every node of a run has, read before vLLM starts: one small Ray task per node (or this process).

Each probe writes the run's files (the QUANT_CONFIG INC reads at start-up must exist at the same path on
every node), checks that the model is at the same path with the same config.json and shards, reads the
host's available memory, and on Gaudi asks `hl-smi` for the device type and HBM. It never opens a device:
a probe holding a Gaudi card would take it from a vLLM rank.

Call `engine.launch.connect_ray` first: the probes are tasks of the run's Ray job.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from dataclasses import dataclass, replace
from pathlib import Path

from ray_calib import atomic
from ray_calib.cluster import hlsmi
from ray_calib.engine.device import host_available_bytes
from ray_calib.errors import ClusterError, EngineError, ModelError


@dataclass(frozen=True)
class NodeFacts:
    node: str  # Ray node IP, or "local"
    hostname: str
    mem_available: int | None
    model_found: bool
    model_digest: str | None  # config.json sha256 + shard names and sizes
    device_type: str | None = None  # gaudi2/gaudi3 from hl-smi
    cards: int = 0
    card_bytes: int | None = None
    driver: str | None = None
    device_error: str | None = None


def node_facts(model_dir: str, files: dict[str, str], gaudi: bool) -> NodeFacts:
    """Runs on the node: write `files` (path -> text), then report."""
    for path, text in files.items():
        atomic.write_text(path, text)
    found, digest = model_digest(Path(model_dir))
    facts = NodeFacts(
        node=_node_ip(),
        hostname=socket.gethostname(),
        mem_available=host_available_bytes(),
        model_found=found,
        model_digest=digest,
    )
    if not gaudi:
        return facts

    try:
        info = hlsmi.query()
    except EngineError as err:
        return replace(facts, device_error=err.message)
    return replace(
        facts, device_type=info.device_type, cards=info.cards, card_bytes=info.memory_bytes, driver=info.driver
    )


def model_digest(model_dir: Path) -> tuple[bool, str | None]:
    """(config.json present, a digest of config.json and the shard names and sizes)."""
    config = model_dir / "config.json"
    if not config.is_file():
        return False, None
    digest = hashlib.sha256(config.read_bytes())
    for shard in sorted(model_dir.glob("*.safetensors")):
        digest.update(f"{shard.name}:{shard.stat().st_size};".encode())
    return True, digest.hexdigest()[:16]


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "local"


def probe(model_dir: str, files: dict[str, str], *, gaudi: bool, use_ray: bool) -> list[NodeFacts]:
    """Facts of every alive Ray node (`use_ray`), else of this node only."""
    if not use_ray:
        return [node_facts(model_dir, files, gaudi)]
    return _on_every_node(node_facts, model_dir, files, gaudi)


def remove_everywhere(path: str, *, use_ray: bool) -> None:
    """Remove a run's node-local directory on every node (best effort: cleanup must not mask the run's error)."""
    try:
        if use_ray:
            _on_every_node(_remove, path)
        else:
            _remove(path)
    except Exception:  # noqa: BLE001 - a node that died meanwhile keeps its /tmp directory
        pass


def _remove(path: str) -> bool:
    shutil.rmtree(path, ignore_errors=True)
    return not os.path.exists(path)


def _on_every_node(function, *args) -> list:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(function)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(*args)
        for n in nodes
    ]
    try:
        return ray.get(refs, timeout=300)
    except Exception as err:  # a node's task failed or timed out: name the Ray error in one line
        raise ClusterError(
            "ray",
            f"a per-node check failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})",
            fix="check `ray status` and the nodes' Ray logs.",
        ) from err


def check_nodes(facts: list[NodeFacts], model_dir: str, *, gaudi: bool) -> None:
    """Same model on every node, one Gaudi generation everywhere; errors name the node."""
    missing = [f for f in facts if not f.model_found]
    if missing:
        raise ModelError(
            f"{model_dir}: no config.json on node {missing[0].node} ({missing[0].hostname})",
            fix="put the model at the same path on every node (or on a shared file system).",
        )
    digests = {f.model_digest for f in facts}
    if len(digests) > 1:
        odd = next(f for f in facts if f.model_digest != facts[0].model_digest)
        raise ModelError(
            f"{model_dir}: node {odd.node} ({odd.hostname}) holds another copy than node {facts[0].node} "
            "(config.json or shard sizes differ)",
            fix="copy the same model to every node.",
        )
    if not gaudi:
        return
    for f in facts:
        if f.device_error:
            raise ClusterError(f.node, f.device_error, fix="check `hl-smi` on that node.")
    types = {f.device_type for f in facts}
    if len(types) > 1:
        raise ClusterError(
            facts[-1].node,
            f"nodes mix {' and '.join(sorted(map(str, types)))}",
            fix="one run needs one Gaudi generation (their scales differ).",
        )
