"""MoE statistics against a plain per-slot reference, on the device, without reading values on the host.

The routed layer here is a stand-in with the attributes `MoEStats` reads from vLLM's RoutedExperts
(local_num_experts, expert_map, activation, and the expert weights captured before repacking).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ray_calib.engine import weights
from ray_calib.engine.weights import EXPERT_AMAX_ATTR, EXPERT_W13_ATTR
from ray_calib.measure import moe
from ray_calib.measure.moe import MoEStats

EXPERTS, HIDDEN, INTER, TOP_K = 8, 64, 32, 2
BF16_ULP = 2.0**-7  # largest relative spacing of bf16 numbers (8 significant bits)


def routed_layer(device: str = "cpu", expert_map: torch.Tensor | None = None, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=generator).to(torch.bfloat16).to(device)
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, generator=generator).to(torch.bfloat16).to(device)
    layer = SimpleNamespace(
        local_num_experts=EXPERTS,
        expert_map=expert_map,
        activation=SimpleNamespace(value="silu"),
        w13_weight=w13,
        w2_weight=w2,
    )
    if device == "meta":  # the capture skips meta tensors (vLLM's dummy init): set what it would
        setattr(layer, EXPERT_W13_ATTR, w13)
        setattr(layer, EXPERT_AMAX_ATTR, (torch.empty(EXPERTS, device=device),) * 2)
    else:
        weights._record_experts(layer)  # what the loader hook records before the backend repacks
    return layer


def batch(tokens: int, seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=generator).to(torch.bfloat16).to(device)
    ids = torch.stack([torch.randperm(EXPERTS, generator=generator)[:TOP_K] for _ in range(tokens)]).to(device)
    return x, ids


def reference(layer, batches, local=None) -> tuple[list[int], list[float], list[float]]:
    """Counts, input amax and intermediate amax per expert, slot by slot in float64."""
    w13 = getattr(layer, EXPERT_W13_ATTR).double()
    counts, inputs, inter = [0] * EXPERTS, [0.0] * EXPERTS, [0.0] * EXPERTS
    for x, ids in batches:
        for t in range(x.shape[0]):
            for e in ids[t].tolist():
                e = e if local is None else local[e]
                if e < 0:
                    continue
                h = x[t].double() @ w13[e].t()
                counts[e] += 1
                inputs[e] = max(inputs[e], x[t].double().abs().max().item())
                value = (torch.nn.functional.silu(h[:INTER]) * h[INTER:]).abs().max().item()
                inter[e] = max(inter[e], value)
    return counts, inputs, inter


def check(stats: MoEStats, layer, batches, local=None) -> None:
    counts, inputs, inter = reference(layer, batches, local)
    nodes = stats.nodes()
    assert stats.token_counts() == counts
    op = nodes["moe"]
    assert op["inputs"][0][0][0] == max(x.abs().max().float().item() for x, _ in batches)
    for k in range(EXPERTS):
        w13, w2 = nodes[f"moe.w13_list.{k}"], nodes[f"moe.w2_list.{k}"]
        assert w13["inputs"][0][0][0] == inputs[k], "a routed token's amax, exactly"
        got = w2["inputs"][0][0][0]
        assert got == op["outputs"][1 + k][0][0]
        # bf16 GEMM, activation and product: a few roundings of at most half a bf16 spacing each
        assert abs(got - inter[k]) <= 4 * BF16_ULP * inter[k], (k, got, inter[k])
        assert (got > 0) == (counts[k] > 0)
        assert w13["params"]["weight"][0][0] == layer.w13_weight[k].abs().max().float().item()
        assert w2["params"]["weight"][0][0] == layer.w2_weight[k].abs().max().float().item()


@pytest.mark.parametrize(
    "held", [1 << 20, 40 * HIDDEN * 2, 1], ids=["all-steps-held", "folds-at-40-tokens", "every-step-folded"]
)
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-gemm", "loop-per-expert"])
def test_matches_a_per_slot_reference(grouped, held, monkeypatch):
    monkeypatch.setattr(moe, "_PENDING_BYTES", held)
    if not grouped:
        monkeypatch.setitem(moe._GROUPED_MM, ("cpu", torch.bfloat16), False)
    layer = routed_layer()
    stats = MoEStats("moe", layer)
    batches = [batch(40, seed=1), batch(3, seed=2), batch(1, seed=3), batch(30, seed=4), batch(2, seed=6)]
    for x, ids in batches:
        stats.observe(x, ids, x * 2)
    check(stats, layer, batches)
    assert stats.nodes()["moe"]["outputs"][0][0][0] == 2 * max(x.abs().max().float().item() for x, _ in batches)


def test_expert_parallel_counts_only_this_ranks_experts():
    """Global ids 0..15 over two ranks: this rank holds experts 8..15 as local 0..7."""
    local = [-1] * EXPERTS + list(range(EXPERTS))
    layer = routed_layer(expert_map=torch.tensor(local))
    stats = MoEStats("moe", layer)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(30, HIDDEN, generator=generator).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(2 * EXPERTS, generator=generator)[:TOP_K] for _ in range(30)])
    stats.observe(x, ids, x)
    check(stats, layer, [(x, ids)], local)


def test_reset_and_unrouted_experts():
    layer = routed_layer()
    stats = MoEStats("moe", layer)
    x, _ = batch(4, seed=7)
    stats.observe(x, torch.zeros(4, TOP_K, dtype=torch.int64), x)  # every slot to expert 0
    assert stats.token_counts() == [8] + [0] * (EXPERTS - 1)
    assert stats.nodes()["moe.w2_list.1"]["inputs"][0][0][0] == 0.0
    stats.reset()
    assert stats.token_counts() == [0] * EXPERTS and not stats.called


def test_observe_never_reads_a_value_on_the_host():
    """On the meta device every host read (.item(), .tolist(), bool()) raises: observe() must need none."""
    layer = routed_layer(device="meta")
    stats = MoEStats("moe", layer)
    x = torch.empty(16, HIDDEN, dtype=torch.bfloat16, device="meta")
    ids = torch.empty(16, TOP_K, dtype=torch.int64, device="meta")
    stats.observe(x, ids, x)
    stats.observe(x[:2], ids[:2], x[:2])
    assert stats.counts.device.type == "meta" and stats.expert_inter.device.type == "meta"
    with pytest.raises((RuntimeError, NotImplementedError)):
        stats.token_counts()  # the host copy happens here, at collect time


def test_the_capture_keeps_no_reference_to_w2_and_records_its_per_expert_range():
    """After the backend replaces w2 (repacking), the unpacked W2 must be freed: only its ranges stay."""
    import gc
    import weakref

    layer = routed_layer()
    w2 = layer.w2_weight
    expected = w2.abs().amax(dim=(1, 2)).float()
    gone = weakref.ref(w2)
    layer.w2_weight = torch.empty(0)  # what a repacking backend leaves behind
    del w2
    gc.collect()
    assert gone() is None, "the capture still holds the pre-repack W2"
    assert torch.equal(getattr(layer, EXPERT_AMAX_ATTR)[1], expected)
    stats = MoEStats("moe", layer)
    assert [stats.nodes()[f"moe.w2_list.{k}"]["params"]["weight"][0][0] for k in range(EXPERTS)] == expected.tolist()


def test_held_steps_fold_to_the_same_statistics_as_folding_each_step(monkeypatch):
    """Decode steps are held and folded at collect time: same counts and maxima as folding every step at once."""
    steps = [batch([40, 3, 1, 7][seed % 4], seed=seed) for seed in range(12)]  # prefill and decode-sized steps
    folded = {}
    for held in (1 << 30, 1):  # everything held until collect / every step folded as it comes
        monkeypatch.setattr(moe, "_PENDING_BYTES", held)
        layer = routed_layer()
        stats = MoEStats("moe", layer)
        for x, ids in steps:
            stats.observe(x, ids, x * 2)
        if held > 1:
            assert int(stats.counts.sum()) == 0 and stats.op_input.hi is None, "nothing folded before collect"
        folded[held] = (stats.nodes(), stats.token_counts())
    (held_nodes, held_counts), (step_nodes, step_counts) = folded[1 << 30], folded[1]
    assert held_counts == step_counts and sum(held_counts) == TOP_K * sum(x.shape[0] for x, _ in steps)
    assert held_nodes.keys() == step_nodes.keys()
    for name, node in held_nodes.items():
        assert node.get("params") == step_nodes[name].get("params")
        if ".w2_list." in name:  # recomputed by a GEMM, whose rounding may depend on how many rows it gets
            got, want = node["inputs"][0][0][0], step_nodes[name]["inputs"][0][0][0]
            assert abs(got - want) <= 4 * BF16_ULP * want, (name, got, want)
        elif name == "moe":
            assert node["inputs"] == step_nodes[name]["inputs"] and node["outputs"][0] == step_nodes[name]["outputs"][0]
        else:
            assert node == step_nodes[name], name  # counts and input maxima: exact


def test_held_steps_are_copies_of_the_engine_buffers(monkeypatch):
    """The engine reuses its input buffers for the next step: a held step must not see them overwritten."""
    monkeypatch.setattr(moe, "_PENDING_BYTES", 1 << 30)
    layer = routed_layer()
    stats = MoEStats("moe", layer)
    steps = [batch(3, seed=8), batch(1, seed=9)]
    buffer_x, buffer_ids = torch.empty(4, HIDDEN, dtype=torch.bfloat16), torch.empty(4, TOP_K, dtype=torch.int64)
    for x, ids in steps:
        rows = x.shape[0]
        buffer_x[:rows], buffer_ids[:rows] = x, ids
        stats.observe(buffer_x[:rows], buffer_ids[:rows], x)
    buffer_x.fill_(1000.0)
    buffer_ids.fill_(EXPERTS - 1)
    check(stats, layer, steps)


def test_reset_drops_held_steps(monkeypatch):
    monkeypatch.setattr(moe, "_PENDING_BYTES", 1 << 30)
    stats = MoEStats("moe", routed_layer())
    x, ids = batch(3, seed=10)
    stats.observe(x, ids, x)
    stats.reset()
    nodes = stats.nodes()
    assert stats.token_counts() == [0] * EXPERTS and nodes["moe"]["inputs"] == [[[0.0]]]
    assert all(nodes[f"moe.w13_list.{k}"]["inputs"] == [[[0.0]]] for k in range(EXPERTS))


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-gemm", "loop-per-expert"])
def test_per_expert_hessians_match_a_per_slot_reference(grouped, monkeypatch):
    """H of each expert's W13 input (its routed tokens) and W2 input (their intermediate), held steps folded."""
    monkeypatch.setattr(moe, "_PENDING_BYTES", 40 * HIDDEN * 2)
    if not grouped:
        monkeypatch.setitem(moe._GROUPED_MM, ("cpu", torch.bfloat16), False)
    layer = routed_layer()
    stats = MoEStats("moe", layer, hessians=True)
    assert stats.hessian_bytes == 4 * EXPERTS * (HIDDEN**2 + INTER**2)
    batches = [batch(40, seed=1), batch(3, seed=2), batch(30, seed=4)]
    for x, ids in batches:
        stats.observe(x, ids, x)
    stats.reset()
    others = torch.tensor([k for k in range(EXPERTS) if k != 5])  # no token routed to expert 5: it gets no H
    generator = torch.Generator().manual_seed(8)
    ids = torch.stack([others[torch.randperm(EXPERTS - 1, generator=generator)[:TOP_K]] for _ in range(73)])
    stats.observe(torch.cat([x for x, _ in batches]), ids, None)
    got = stats.hessian_matrices()
    assert sorted(got) == sorted(
        f"moe.{kind}.{k}" for kind in ("w13_list", "w2_list") for k in range(EXPERTS) if k != 5
    )
    x, w13 = torch.cat([x for x, _ in batches]).double(), getattr(layer, EXPERT_W13_ATTR).double()
    for k in set(range(EXPERTS)) - {5}:
        rows = x[(ids == k).any(dim=1)]
        h = rows @ w13[k].t()
        act = torch.nn.functional.silu(h[:, :INTER]) * h[:, INTER:]
        torch.testing.assert_close(got[f"moe.w13_list.{k}"].double(), rows.t() @ rows, rtol=1e-5, atol=1e-3)
        want = act.t() @ act  # the bf16 GEMM and activation round each intermediate by a few bf16 spacings
        assert (got[f"moe.w2_list.{k}"].double() - want).norm() <= 8 * BF16_ULP * want.norm(), k


def test_no_hessians_under_expert_parallelism():
    layer = routed_layer(expert_map=torch.tensor([-1] * EXPERTS + list(range(EXPERTS))))
    stats = MoEStats("moe", layer, hessians=True)
    x, ids = batch(8, seed=9)
    stats.observe(x, ids + EXPERTS, x)
    assert not stats.hessians and stats.hessian_bytes == 0 and stats.hessian_matrices() == {}
