"""vLLM's CPU platform with a Ray device key, so `distributed_executor_backend="ray"` can place CPU workers.

vLLM's CpuPlatform has no `ray_device_key` ("current platform cpu does not support ray"). "HPU" is a
resource name Ray already knows; CPU Ray nodes are started with `--resources='{"HPU": N}'`, N = the
number of TP ranks that node may run. Loaded only through `plugins.cpu_ray_platform`.

Its communicator (`cpu_ray_comm.CpuRayCommunicator`, a module of its own: vLLM imports it by name once
the platform is set, and importing vLLM's communicators here would be circular) keeps vLLM's shared-memory
all-reduce only where that can work: every rank of the group on one host (one kernel boot id; Ray nodes
on 127.0.0.1 and 127.0.0.2 of one box count as one host), and no more than 8 of them. Other groups, e.g.
TP=16, use torch.distributed (gloo).
"""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform  # noqa: TID253  a vLLM platform class: heavy by nature (pyproject.toml)

from ray_calib.engine.plugins import RAY_DEVICE_KEY


class CpuRayPlatform(CpuPlatform):
    ray_device_key: str = RAY_DEVICE_KEY

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        return "ray_calib.engine.cpu_ray_comm.CpuRayCommunicator"
