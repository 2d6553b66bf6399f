"""One-node inference with the FP8 result and the fidelity check against BF16.

runner     offline generation and `vllm serve` with the run's engine settings; device-type guard
fidelity   same texts through BF16 and FP8: top-1 agreement, KL, perplexity (ray-calib eval)
audit      every scale the FP8 checkpoint carries is in use in the engine (read back over collective_rpc)
"""
