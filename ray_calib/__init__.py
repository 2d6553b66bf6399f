"""ray-calib: calibrate very large LLMs for FP8 inference across a Ray cluster."""

__version__ = "0.1.0"
