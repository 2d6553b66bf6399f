"""The communicator of `cpu_ray.CpuRayPlatform`: vLLM's CPU one, with shared memory only where it can work.

vLLM names a CPU shared-memory group by the init port alone, so it would put ranks on different hosts,
or more than `SHM_MAX_RANKS` ranks, in one group; such groups use torch.distributed (gloo) instead.
"""

from __future__ import annotations

import socket
from pathlib import Path

from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator  # noqa: TID253  (pyproject.toml)

SHM_MAX_RANKS = 8  # vLLM CPU's init_shm_manager asserts group_size <= 8


class CpuRayCommunicator(CpuCommunicator):
    def _all_group_ranks_share_shm_group_name(self) -> bool:
        import torch

        hosts: list[str] = [""] * self.world_size
        torch.distributed.all_gather_object(hosts, boot_id(), group=self.device_group)
        if len(set(hosts)) != 1 or self.world_size > SHM_MAX_RANKS:
            return False  # every rank sees the same list, so all take the same branch
        return super()._all_group_ranks_share_shm_group_name()


def boot_id() -> str:
    """The same for every process of one running kernel (Ray nodes on 127.0.0.1 and 127.0.0.2 of one box
    share it), different on another host."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()
