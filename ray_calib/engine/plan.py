"""What a run would start, per node, printed by `--dry-run` before an hour of cluster time is spent.

The plan is built from the same objects the run uses (EngineConfig -> `llm_kwargs`, `worker_env`), so
the dry run shows exactly the engine arguments, the env every rank gets and the QUANT_CONFIG it reads,
and, from devices.conf, which node runs which ranks with which node env. Nothing is started and no
device is opened.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from typing import Any

from ray_calib.cluster.ray_nodes import node_env
from ray_calib.engine.launch import EngineConfig, env_to_copy, llm_kwargs, worker_env


@dataclass
class NodePlan:
    name: str
    ip: str
    ranks: list[int]
    devices: int
    node_env: dict[str, str]  # exported by `ray-calib up` before `ray start` (Ray workers inherit it)
    source_file: str | None = None
    driver: bool = False


@dataclass
class EnginePlan:
    title: str
    facts: list[tuple[str, str]]
    engine: EngineConfig
    quant_config: dict[str, Any] | None = None
    quant_config_path: str | None = None
    nodes: list[NodePlan] = field(default_factory=list)
    serve_args: list[str] | None = None  # `vllm serve` instead of `vllm.LLM`
    warnings: list[str] = field(default_factory=list)
    quant_config_note: str | None = None  # where the QUANT_CONFIG comes from

    @property
    def kwargs(self) -> dict[str, Any]:
        return llm_kwargs(self.engine)

    @property
    def env(self) -> dict[str, str]:
        return worker_env(self.engine)

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "facts": dict(self.facts),
            "engine_args": self.kwargs,
            "env": self.env,
            "serve_args": self.serve_args,
            "quant_config_path": self.quant_config_path,
            "quant_config": self.quant_config,
            "warnings": self.warnings,
            "nodes": [vars(node) for node in self.nodes],
        }

    def render(self) -> str:
        width = max((len(k) for k, _ in self.facts), default=0)
        lines = [self.title]
        for key, value in self.facts:
            for i, part in enumerate(value.split("\n")):
                lines.append(f"  {key if i == 0 else '':<{width}}  {part}")
        if self.serve_args is not None:
            lines.append("command (on the head):")
            lines.append("  " + " ".join(shlex.quote(a) for a in self.serve_args))
        lines.append("engine arguments (vllm.LLM, on the head):")
        lines += [f"  {key}={value!r}" for key, value in self.kwargs.items()]
        where = (
            "this process and the Ray job's runtime_env"
            if self.engine.resolved_executor == "ray"
            else "this process (the ranks inherit it)"
        )
        lines.append(f"env of every rank (set in {where}):")
        lines += [f"  {key}={value}" for key, value in self.env.items()]
        if self.quant_config is not None:
            note = self.quant_config_note or "written on every node before vLLM starts"
            lines.append(f"QUANT_CONFIG {self.quant_config_path} ({note}):")
            lines += ["  " + line for line in json.dumps(self.quant_config, indent=2).splitlines()]
        if self.nodes:
            lines.append("nodes:")
            total = sum(len(n.ranks) for n in self.nodes)
            for node in self.nodes:
                role = " (driver)" if node.driver else ""
                lines.append(
                    f"  {node.name} {node.ip}{role}: ranks {_span(node.ranks)} of {total}, {node.devices} device(s)"
                )
                if node.source_file:
                    lines.append(f"    sources {node.source_file} before `ray start`")
                if node.node_env:
                    lines.append("    node env: " + " ".join(f"{k}={v}" for k, v in node.node_env.items()))
        if self.warnings:
            lines.append("warnings:")
            lines += [f"  - {w}" for w in self.warnings]
        return "\n".join(lines)


def _span(ranks: list[int]) -> str:
    if not ranks:
        return "none"
    return f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])


def nodes_from_conf(conf, tp_size: int) -> list[NodePlan]:
    """Rank placement over devices.conf's nodes: the driver's node (the head) first, each up to its devices.

    vLLM's Ray executor sorts its workers with the driver's node first, and ranks follow that order.
    """
    plans, next_rank = [], 0
    for node in conf.nodes:
        take = max(0, min(node.devices, tp_size - next_rank))
        env = {k: _unquote(v) for k, v in node_env(node, conf.token_path).items()}
        plans.append(
            NodePlan(
                name=node.name,
                ip=node.ip,
                ranks=list(range(next_rank, next_rank + take)),
                devices=node.devices,
                node_env=env,
                source_file=node.source_file,
                driver=node.role == "head",
            )
        )
        next_rank += take
    return plans


def local_node(tp_size: int, devices: int | None = None) -> list[NodePlan]:
    return [
        NodePlan(
            name="local",
            ip="this host",
            ranks=list(range(tp_size)),
            devices=devices or tp_size,
            node_env={},
            driver=True,
        )
    ]


def with_copy_list(env: dict[str, str]) -> dict[str, str]:
    """`env` plus VLLM_RAY_EXTRA_ENV_VARS_TO_COPY naming its non-VLLM_ variables."""
    names = env_to_copy(env)
    return {**env, "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY": names} if names else dict(env)


def _unquote(value: str) -> str:
    try:
        words = shlex.split(value)
    except ValueError:
        return value
    return words[0] if len(words) == 1 else value
