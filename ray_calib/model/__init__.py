"""A Hugging Face model directory, read side: the facts every stage asks about the model it works on.

    config          config.json: routed experts, MLA, the JSON reader with one-line errors
    safetensors_io  header parsing, one-tensor-at-a-time ShardReader, streaming ShardWriter with checksum
    checkpoint      a model directory: shards, tensor table, byte sizes, index, free space
    names           vLLM module names <-> checkpoint tensor names (fused groups, expert children, KV scales)

The lowest layer above the core modules: it imports nothing else of ray_calib.
"""
