"""Properties of unify on generated sets: max over a group is the max of its members; chains associate."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from ray_calib.inc import RankFile, StatsName
from ray_calib.measurements import expand_rank, unify_ranks
from tests.measurements.synthetic import rank_nodes


def _ranks(world_size: int, seed: int, experts: int) -> list[RankFile]:
    rng = random.Random(seed)
    return [
        RankFile(name=StatsName("p", rank=r, world_size=world_size), nodes=rank_nodes(rng, layers=2, experts=experts))
        for r in range(world_size)
    ]


def _leaves(value):
    if isinstance(value, list) and value and not isinstance(value[0], list):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), log_world=st.integers(1, 4), experts=st.sampled_from([0, 2]))
def test_chains_are_associative(seed, log_world, experts):
    world_size = 2**log_world
    ranks = _ranks(world_size, seed, experts)
    direct = unify_ranks(ranks, 1)[0]
    chained = ranks
    size = world_size
    while size > 1:
        size //= 2
        chained = unify_ranks(chained, size)
    assert chained[0].nodes == direct.nodes


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), world_size=st.sampled_from([2, 4, 6, 8]), data=st.data())
def test_group_max_is_max_of_members(seed, world_size, data):
    ranks = _ranks(world_size, seed, experts=0)
    to = data.draw(st.sampled_from([m for m in range(1, world_size) if world_size % m == 0]))
    group = world_size // to
    for target, merged in enumerate(unify_ranks(ranks, to)):
        members = ranks[target * group : (target + 1) * group]
        for module, node in merged.nodes.items():
            merged_leaves = list(_leaves(node))
            member_leaves = [list(_leaves(m.nodes[module])) for m in members]
            for i, leaf in enumerate(merged_leaves):
                assert leaf == [max(ms[i][k] for ms in member_leaves) for k in range(len(leaf))]
                assert all(leaf[k] >= ms[i][k] for ms in member_leaves for k in range(len(leaf)))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), world_size=st.sampled_from([2, 4]))
def test_expert_parallel_concatenates_and_expand_inverts(seed, world_size):
    ranks = _ranks(world_size, seed, experts=3)
    merged = unify_ranks(ranks, 1)[0]
    op = "model.layers.1.mlp.experts.moe_op"
    assert merged.nodes[op]["outputs"][1:] == [leaf for r in ranks for leaf in r.nodes[op]["outputs"][1:]]
    assert merged.nodes[f"{op}.w2_list.{3 + 2}"] == ranks[1].nodes[f"{op}.w2_list.2"]
    for original, expanded in zip(ranks, expand_rank(merged, world_size)):
        assert expanded.nodes[op]["outputs"][1:] == original.nodes[op]["outputs"][1:]
        assert {k: v for k, v in expanded.nodes.items() if ".w" in k and "_list." in k} == {
            k: v for k, v in original.nodes.items() if ".w" in k and "_list." in k
        }
