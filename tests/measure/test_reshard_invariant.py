"""The proof that re-sharding is right: unify(measure at TP=4, M) matches measure at TP=M.

Prefill-only runs (one new token) of the same prompts.

Exact: weights, and everything upstream of the first all-reduce that sums partial results (layer 0's
attention inputs, before o_proj reduces): shards are contiguous and max is associative.

Within a tolerance derived here, on this machine, from the numerics themselves. Downstream of an
all-reduce, a run at another TP size adds the partial sums in another order, and each rank rounds its
partial sum to bf16 before the reduce; every later activation then differs by rounding, amplified or
damped by the layers after it, and a MoE router whose scores nearly tie can pick another expert, which
moves that token's later activations by more than rounding. How large that gets depends on the kernels
(AMX or not), so it is measured, not assumed. The *envelope*: the model and two permuted copies of it
(`permute`: the same function, every sum in another order, every TP=4 rank's partial sums made of other
units) are measured at TP=4 and unified to M -- the same mechanism, at the same TP and granularity
(rank by rank at M) as the comparison under test -- and the envelope is the worst difference over the
three pairs. Differences are counted in bf16 spacings at the value (every range is a bf16 number, so
they come in whole spacings; 1 spacing is 2^-8 to 2^-7 relative). The envelope is pooled over all
activations downstream of the first reduce: rounding and routing flips act on all of them alike, and a
per-family figure over a handful of leaves (3 MoE layers, 4 KV caches) is too small a sample to bound
anything; per-family figures (relative, and in spacings) are printed. Limit = 2 x envelope, at least
one spacing: the worst case over a few hundred leaves is itself a random draw, and the comparison
under test is one more draw than the three the envelope saw. A sharding or naming bug moves ranges by
far more.

Routing flips (token-slots whose expert changed) are rare independent events: the test's count and
the envelope's (its largest pair) are compared as two Poisson counts over the same slots -- given their
sum, the test's share is Binomial(sum, 1/2) if the rates are equal -- and the test fails when a count
that high would be seen by chance with probability below 0.1 %.

Left out by definition: pre-reduce partial outputs (RowParallel `outputs[0]`, the fused MoE op's routed
output `outputs[0]`), whose range depends on the TP size. Per-expert ranges are compared through what
does not depend on which expert took a token -- the maximum over the layer's experts -- and the single
experts' worst difference is printed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import combinations
from math import comb, floor, log2

import pytest

from ray_calib.inc import MeasurementSet, read_coverage
from ray_calib.measurements import unify_ranks
from tests.measure.conftest import ARCH_BACKENDS

pytestmark = [pytest.mark.slow, pytest.mark.extended]

SOURCE_TP = 4
PERMUTED_SEEDS = (1, 2)  # with the model itself: three realizations of the same function at TP=4
FLIP_SIGNIFICANCE = 0.001
FAMILIES = ("linear inputs", "row-parallel post-reduce", "MoE op input", "experts (layer max)", "KV/latent cache")


def leaf_family(name: str, node: dict, where: str) -> str | None:
    """The node family of one leaf, "weights", "single expert", or None for pre-reduce partial sums."""
    if where.startswith("params."):
        return "weights"
    if "_cache" in name:
        return "KV/latent cache"
    if ".w13_list." in name or ".w2_list." in name:
        return "single expert"
    if where == "outputs[0]":
        return None  # row-parallel layers and the MoE op: this rank's partial sum
    if len(node.get("outputs", [])) > 2:  # the MoE op: [routed output, amax of expert 0..E-1]
        return "MoE op input" if where == "inputs[0]" else "single expert"
    if where.startswith("outputs"):
        return "row-parallel post-reduce"
    return "linear inputs"


def leaves(node: dict):
    for i, leaf in enumerate(node.get("inputs", [])):
        yield f"inputs[{i}]", leaf[0][0]
    for i, leaf in enumerate(node.get("outputs", [])):
        yield f"outputs[{i}]", leaf[0][0]
    for key, leaf in node.get("params", {}).items():
        yield f"params.{key}", leaf[0][0]


def upstream_of_first_reduce(name: str, where: str) -> bool:
    return where.startswith("params.") or (name.startswith("model.layers.0.self_attn.") and where.startswith("inputs"))


def expert_group(name: str, where: str) -> str:
    """The MoE layer (and kind) a per-expert leaf belongs to: its experts' maximum is routing-independent."""
    for kind in (".w13_list.", ".w2_list."):
        if kind in name:
            return name.split(kind)[0] + kind
    return name + ".outputs"


@dataclass(frozen=True)
class Diff:
    relative: float = 0.0
    spacings: float = 0.0  # |a - b| in bf16 spacings at the larger value

    @classmethod
    def of(cls, a: float, b: float) -> Diff:
        top = max(abs(a), abs(b))
        if top == 0.0:
            return cls()
        return cls(abs(a - b) / top, abs(a - b) / 2.0 ** (floor(log2(top)) - 7))

    def __or__(self, other: Diff) -> Diff:
        return Diff(max(self.relative, other.relative), max(self.spacings, other.spacings))


def compare(got_files, want_files, *, exact_upstream: bool) -> dict[str, Diff]:
    """Worst difference per family (weights must be equal; `exact_upstream`: layer 0 attention inputs too)."""
    worst = {family: Diff() for family in (*FAMILIES, "single expert")}
    per_layer: dict[str, list[tuple[float, float]]] = {}
    for got, want in zip(got_files, want_files, strict=True):
        assert got.nodes.keys() == want.nodes.keys(), sorted(got.nodes.keys() ^ want.nodes.keys())[:5]
        for name, node in want.nodes.items():
            for (where, a), (_, b) in zip(leaves(got.nodes[name]), leaves(node), strict=True):
                family = leaf_family(name, node, where)
                if family is None:
                    continue
                if family == "weights" or (exact_upstream and upstream_of_first_reduce(name, where)):
                    assert a == b, f"{name} {where}: {a} != {b} (must be exact)"
                    continue
                worst[family] |= Diff.of(a, b)
                if family == "single expert":
                    per_layer.setdefault(f"{got.rank}:{expert_group(name, where)}", []).append((a, b))
    for values in per_layer.values():
        a, b = max(v[0] for v in values), max(v[1] for v in values)
        worst["experts (layer max)"] |= Diff.of(a, b)
    return worst


def rank_files(run):
    return MeasurementSet.discover(run.out).read_all()


@pytest.fixture(scope="module")
def envelope(measured):
    """`envelope(arch, backend, to_tp)` -> (worst difference per family, flipped slots) over the pairs."""
    cache = {}

    def get(arch: str, backend: str | None, to_tp: int):
        if (arch, backend, to_tp) not in cache:
            runs = [measured(arch, SOURCE_TP, True, backend, permuted=seed) for seed in (0, *PERMUTED_SEEDS)]
            unified = [unify_ranks(rank_files(run), to_tp, expert_parallel=False) for run in runs]
            families = {family: Diff() for family in (*FAMILIES, "single expert")}
            for a, b in combinations(unified, 2):
                for family, diff in compare(a, b, exact_upstream=False).items():
                    families[family] |= diff
            flips = max(flipped_slots(a.out, b.out) for a, b in combinations(runs, 2))
            cache[arch, backend, to_tp] = families, flips
        return cache[arch, backend, to_tp]

    return get


def flipped_slots(a_dir, b_dir) -> int:
    """Token-slots whose expert differs between two runs (a lower bound from the per-expert counts)."""
    a, b = read_coverage(a_dir), read_coverage(b_dir)
    if a is None:
        return 0
    return sum(abs(x - y) for op in a.experts for x, y in zip(a.experts[op], b.experts[op])) // 2


def flip_p_value(test: int, reference: int) -> float:
    """P(at least `test` of `test + reference` events fall on the test's side) when both rates are equal."""
    total = test + reference
    return sum(comb(total, k) for k in range(test, total + 1)) / 2**total


@pytest.mark.parametrize("to_tp", [2, 1])
@pytest.mark.parametrize("arch,backend", ARCH_BACKENDS)
def test_unify_tp4_matches_direct_measurement(measured, envelope, arch, backend, to_tp):
    families, envelope_flips = envelope(arch, backend, to_tp)
    pooled = max(families[f].spacings for f in FAMILIES)
    limit = max(2 * pooled, 1.0)
    tp4_run = measured(arch, SOURCE_TP, True, backend)
    direct_run = measured(arch, to_tp, to_tp == 2, backend)  # the TP=1 runs use BF16 KV: no KV nodes to compare
    direct = rank_files(direct_run)
    unified = unify_ranks(rank_files(tp4_run), to_tp, expert_parallel=False)  # plain TP: every rank holds every expert
    if to_tp == 1:
        unified = [replace(f, nodes={n: v for n, v in f.nodes.items() if "_cache" not in n}) for f in unified]
    worst = compare(unified, direct, exact_upstream=True)
    flips = flipped_slots(tp4_run.out, direct_run.out)
    p_value = flip_p_value(flips, envelope_flips)
    print(
        f"\n{arch} on {backend or 'CPU_ATTN'}: unify(TP{SOURCE_TP} -> {to_tp}) vs TP{to_tp}; weights and layer-0 "
        f"attention inputs exact. Worst difference per node family, relative and in bf16 spacings; envelope = "
        f"model and 2 permuted copies at TP{SOURCE_TP}, unified to {to_tp}; limit = 2 x pooled envelope "
        f"{pooled:.0f} = {limit:.0f} spacings"
    )
    print(f"  {'family':<26} {'unify vs direct':>19} {'envelope':>17}")
    for family in (*FAMILIES, "single expert"):
        got, env = worst[family], families[family]
        print(
            f"  {family:<26} {got.relative:>9.2%} {got.spacings:>4.0f} sp {env.relative:>7.2%} {env.spacings:>4.0f} sp"
        )
    print(
        f"  {'routing flips (slots)':<26} {flips:>19d} {envelope_flips:>17d}   p = {p_value:.3g} "
        f"(fail below {FLIP_SIGNIFICANCE})"
    )
    for family in FAMILIES:
        assert worst[family].spacings <= limit, f"{family}: {worst[family]} > {limit:.0f} spacings"
    assert p_value >= FLIP_SIGNIFICANCE, f"{flips} routing flips against {envelope_flips} in the envelope"
