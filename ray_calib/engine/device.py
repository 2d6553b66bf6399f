"""Which accelerator this process sees (hpu / cuda / cpu) and how much memory one device offers."""

from __future__ import annotations

import importlib.util
import os

DEVICES = ("hpu", "cuda", "cpu")
DEVICE_ENV = "RAY_CALIB_DEVICE"  # force a device (e.g. "cpu" on a GPU box)
GiB = 1 << 30


def detect_device() -> str:
    """Gaudi when habana_frameworks is importable, CUDA when torch sees a GPU, else CPU."""
    forced = os.environ.get(DEVICE_ENV)
    if forced in DEVICES:
        return forced
    if importlib.util.find_spec("habana_frameworks") is not None:
        return "hpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_type(device: str) -> str:
    """The meta sidecar's device type: scales made on gaudi2 differ from gaudi3 (DESIGN §5)."""
    if device != "hpu":
        return device
    from habana_frameworks.torch.hpu import get_device_name  # type: ignore[import-not-found]

    return "gaudi3" if "gaudi3" in get_device_name().lower() else "gaudi2"


def device_memory_bytes(device: str) -> int:
    """Memory of one device; on CPU the host memory still available (ranks share it)."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[1]
    if device == "hpu":
        import habana_frameworks.torch.hpu as hthpu  # type: ignore[import-not-found]

        return hthpu.mem_get_info()[1]
    return host_available_bytes()


def local_device_count(device: str) -> int | None:
    """Devices this node offers for ranks run without Ray; None on CPU (ranks are processes, memory bounds them)."""
    if device == "cuda":
        import torch

        return torch.cuda.device_count()
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
