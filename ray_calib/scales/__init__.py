"""The `scales` stage: range files -> INC scale files per rank, and QUANT_CONFIG files for a run.

    ops           one range node -> one scale node, per INC op type
    weights       `--weights`: each rank's shard of the checkpoint tensors
    files         range files -> INC scale files per rank (`ray-calib scales`)

INC's scale methods, device tables, arithmetic and QUANT_CONFIG schema live in `ray_calib.inc`.
"""
