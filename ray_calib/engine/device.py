"""Which accelerator this process sees (hpu / cuda / cpu) and how much memory one device offers.

Nothing here opens a Gaudi card: the type and HBM of a Gaudi come from `hl-smi` (see `hlsmi`), because a
card this process opened would be missing for one of vLLM's ranks.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass

from ray_calib.cluster import hlsmi

DEVICES = ("hpu", "cuda", "cpu")
GAUDI_TYPES = ("gaudi2", "gaudi3")
DEVICE_CHOICES = ("auto", *DEVICES, *GAUDI_TYPES)
DEVICE_ENV = "RAY_CALIB_DEVICE"  # force a device: hpu, gaudi2, gaudi3, cuda or cpu (e.g. "cpu" on a GPU box)
GiB = 1 << 30


@dataclass(frozen=True)
class Target:
    """The device a run is for: how vLLM runs (`device`) and what the scales depend on (`device_type`)."""

    device: str  # hpu | cuda | cpu
    device_type: str  # gaudi2 | gaudi3 | cuda | cpu (the meta sidecar's device type)
    memory_bytes: int | None = None  # one accelerator's memory (None on CPU: ranks share the host)
    source: str = "detected"

    @property
    def is_gaudi(self) -> bool:
        return self.device == "hpu"

    @property
    def forced(self) -> bool:
        return self.source.startswith("forced")


def detect_device(forced: str | None = None) -> str:
    """Gaudi when habana_frameworks is installed (not imported), CUDA when torch sees a GPU, else CPU."""
    forced = forced if forced not in (None, "auto") else os.environ.get(DEVICE_ENV)
    if forced in GAUDI_TYPES:
        return "hpu"
    if forced in DEVICES:
        return forced
    if importlib.util.find_spec("habana_frameworks") is not None:
        return "hpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def detect_target(forced: str | None = None) -> Target:
    """The run's target; a forced gaudi2/gaudi3 is taken as given (nominal HBM), so dry runs work anywhere."""
    choice = forced if forced not in (None, "auto") else os.environ.get(DEVICE_ENV)
    device = detect_device(choice)
    if device == "cpu":
        return Target("cpu", "cpu", None, f"forced ({choice})" if choice else "detected")
    if device == "cuda":
        import torch

        memory = torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None
        return Target("cuda", "cuda", memory, f"forced ({choice})" if choice else "detected")
    if choice in GAUDI_TYPES:
        info = hlsmi.nominal(choice, f"forced ({choice}), nominal HBM")
    else:
        info = hlsmi.query()
    return Target("hpu", info.device_type, info.memory_bytes, info.source)


def device_type(device: str) -> str:
    """The meta sidecar's device type: scales made on gaudi2 differ from gaudi3 (full scale 240 vs 448)."""
    if device in GAUDI_TYPES:
        return device
    if device != "hpu":
        return device
    return detect_target(os.environ.get(DEVICE_ENV) if os.environ.get(DEVICE_ENV) in GAUDI_TYPES else None).device_type


def device_memory_bytes(device: str) -> int:
    """Memory of one device; on CPU the host memory still available (ranks share it)."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[1]
    if device == "hpu":
        return hlsmi.query().memory_bytes
    return host_available_bytes()


def local_device_count(device: str) -> int | None:
    """Devices this node offers for ranks run without Ray; None on CPU (ranks are processes, memory bounds them)
    and on a Gaudi target without hl-smi (e.g. `--device gaudi2 --dry-run` elsewhere: unknown)."""
    if device == "cuda":
        import torch

        return torch.cuda.device_count()
    if device == "hpu" and shutil.which("hl-smi"):  # hl-smi reads the driver; it never opens a card
        return hlsmi.query().cards
    return None


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what the kernel can hand out without swapping)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
