"""vLLM's CPU platform with a Ray device key, so `distributed_executor_backend="ray"` can place CPU workers.

vLLM's CpuPlatform has no `ray_device_key` ("current platform cpu does not support ray"). "HPU" is a
resource name Ray already knows; CPU Ray nodes are started with `--resources='{"HPU": N}'`, N = the
number of TP ranks that node may run (DESIGN §9). Loaded only through `plugins.cpu_ray_platform`.
"""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform

from ray_calib.engine.plugins import RAY_DEVICE_KEY


class CpuRayPlatform(CpuPlatform):
    ray_device_key: str = RAY_DEVICE_KEY
