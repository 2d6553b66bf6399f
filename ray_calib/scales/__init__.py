"""INC's scale methods, device scale tables and QUANT_CONFIG files.

    arith         INC's bf16 HPU arithmetic (Gaudi) and float64 math (CPU/CUDA), in pure Python
    devices       full scale and HW scale table per device; device_for_scales rules; E5M2
    methods       the scale methods as data + pure functions (maxabs -> scale, weight -> scale)
    target        the INC release the files are for (rules that changed between releases)
    ops           one range node -> one scale node, per INC op type
    weights       `--weights`: each rank's shard of the checkpoint tensors
    files         range files -> INC scale files per rank (`ray-calib scales`)
    quant_config  the six QUANT_CONFIGs of the seeds' flow, validation, stale scale files
"""

from ray_calib.scales.devices import DEVICES, DeviceScales, device_for_scales, get_device
from ray_calib.scales.methods import METHODS, ScaleMethod, activation_scale, get_method, round_scale, scale_from_maxabs

__all__ = ["DEVICES", "METHODS", "DeviceScales", "ScaleMethod", "activation_scale", "device_for_scales", "get_device",
           "get_method", "round_scale", "scale_from_maxabs"]
