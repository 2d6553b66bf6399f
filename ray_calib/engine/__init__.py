"""Everything about starting vLLM for a run: device, executor, worker env, plugins, memory pre-check.

    device      hpu / cuda / cpu detection and the memory one device offers (never opening a Gaudi card)
    hlsmi       Gaudi type and HBM from `hl-smi` (or a short-lived subprocess)
    gaudi       the INC flow's env on Gaudi, checkpoint routes, HBM and host-RAM fit
    nodes       per-node checks before vLLM starts (model present, device, host RAM; files written)
    plan        what a run would start, per node (`--dry-run`)
    launch      EngineConfig -> vLLM `LLM` (TP size, executor uni/mp/ray, worker env)
    memory      weights/TP + KV cache per device vs device memory, before anything starts
    plugins     vLLM entry points: the CPU-on-Ray platform and the pre-repack weight capture
    cpu_ray     the CPU platform with a Ray device key (loaded by vLLM only when the plugin applies)
    weights     records weight amax before vLLM CPU repacks (and empties) linear weights

Nothing here imports torch/vLLM/Ray at module level: the CLI stays fast.
"""
