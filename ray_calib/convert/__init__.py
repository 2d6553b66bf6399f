"""Checkpoint conversion: BF16 -> FP8 (quantize) and DeepSeek block FP8 -> BF16, streamed shard by shard.

    safetensors_io  one-tensor-at-a-time reader, streaming writer with checksum
    checkpoint      a model directory: shards, tensor table, index, free space
    names           vLLM module names <-> checkpoint tensor names (fused groups, KV scales)
    plan            what becomes FP8, with which ranges; name mismatches caught here
    qconfig         the compressed-tensors quantization_config
    quantize        the resumable FP8 writer
    bf16            block-FP8 -> BF16
"""
