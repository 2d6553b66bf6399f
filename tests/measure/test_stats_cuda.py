"""Observer statistics on a CUDA device: no host sync while observing, the same values as the reference.

CUDA's sync debug mode raises on every device-to-host read (`.item()`, `.tolist()`, a data-dependent
output size), so observing under it proves that counts and maxima stay on the device until collected;
MoE folds take the grouped-GEMM path there (the per-expert loop reads counts on the host and would raise).
Skipped where torch sees no CUDA device (the CPU test machines).
"""

from __future__ import annotations

import pytest
import torch

from ray_calib.measure.moe import MoEStats
from ray_calib.measure.stats import MaxAbs, NodeStats
from tests.measure.test_moe_stats import batch, check, routed_layer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def test_node_stats_update_without_a_host_sync():
    node = NodeStats(inputs=[MaxAbs()], outputs=[MaxAbs()])
    tensors = [torch.randn(17, 64, device="cuda", dtype=torch.bfloat16) * scale for scale in (1, 9, 3)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in tensors:
            node.inputs[0].update(t)
            node.outputs[0].update(-2 * t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = max(t.abs().max().float().item() for t in tensors)
    assert node.to_node() == {"inputs": [[[want]]], "outputs": [[[2 * want]]]}


@pytest.mark.parametrize("steps", [1, 5], ids=["one-prefill", "prefill-and-decode-steps"])
def test_moe_stats_observe_and_fold_without_a_host_sync(steps):
    layer = routed_layer(device="cuda")
    stats = MoEStats("moe", layer)
    batches = [batch(40 if i == 0 else 2, seed=i, device="cuda") for i in range(steps)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, ids in batches:
            stats.observe(x, ids, x * 2)
        stats.fold()  # what collect does first
        with pytest.raises(RuntimeError, match="synchroniz"):
            stats.token_counts()  # the control: the host read of collect time is caught
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check(stats, layer, batches)
