"""vLLM plugin entry points (pyproject: `vllm.platform_plugins`, `vllm.general_plugins`).

Both are no-ops unless the engine asked for them through the environment, which it sets before vLLM
starts and which reaches every worker (mp children inherit it; Ray workers get it via the job's
runtime_env). A plain `vllm serve` in the same environment therefore behaves exactly as without us.
"""

from __future__ import annotations

import os

from ray_calib.engine.weights import install

CPU_RAY_ENV = "RAY_CALIB_CPU_RAY"  # "1": schedule CPU workers through Ray (docs/design.md §9)
OBSERVE_ENV = "RAY_CALIB_OBSERVE"  # "1": keep weight ranges from before vLLM repacks weights
RAY_DEVICE_KEY = "HPU"  # the Ray resource CPU ranks ask for; nodes start with --resources='{"HPU": N}'


def cpu_ray_platform() -> str | None:
    """Platform plugin: vLLM's CPU platform plus a Ray device key, only on a CPU build and when asked."""
    if os.environ.get(CPU_RAY_ENV) != "1":
        return None
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() is None:  # a CUDA/HPU build: leave platform detection alone
        return None
    return "ray_calib.engine.cpu_ray.CpuRayPlatform"


def capture_weights() -> None:
    """General plugin: runs in every vLLM process before the model loads."""
    if os.environ.get(OBSERVE_ENV) != "1":
        return

    install()
