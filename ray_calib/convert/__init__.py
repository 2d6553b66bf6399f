"""Checkpoint conversion: BF16 -> FP8 (quantize) and DeepSeek block FP8 -> BF16, streamed shard by shard.

    fp8             numpy FP8 codec: BF16/FP16 -> e4m3 cast tables, integer amax, block FP8 -> BF16
    cast            one weight -> FP8 bytes (numpy, or torch for PCS/opt/FP32), reused buffers, read-ahead
    plan            what becomes FP8, with which ranges; name mismatches caught here
    qconfig         the compressed-tensors quantization_config
    quantize        the resumable FP8 writer
    bf16            block-FP8 -> BF16
    gptq            GPTQ rounding onto the FP8 grid
    pipeline        `quantize` end to end: paths from the run directory, the device's path
    scale_choice    which scales the checkpoint gets on CPU/CUDA without --scale-method

The model directory (shards, headers, names) is read through `ray_calib.model`; scale methods come from
`ray_calib.inc`.
"""
