"""ray-calib: calibrate very large LLMs for FP8 inference across a Ray cluster."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ray-calib")  # pyproject.toml is the one source
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
