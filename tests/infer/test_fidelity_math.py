"""eval's metrics on hand-built logprobs, against values worked out by hand; and the context windows."""

import math

import pytest

from ray_calib.infer.fidelity import mean_kl, perplexity, position_kl, token_windows, top1_agreement

LN = math.log


def pos(argmax: str, top: dict[str, float], actual: float = -1.0) -> dict:
    return {"argmax": argmax, "top": {t: LN(p) for t, p in top.items()}, "actual": actual}


def test_top1_agreement_counts_positions_over_all_texts():
    reference = [[pos("a", {"a": 0.9}), pos("b", {"b": 0.9})], [pos("c", {"c": 0.9})]]
    other = [[pos("a", {"a": 0.9}), pos("x", {"x": 0.9})], [pos("c", {"c": 0.9})]]
    assert top1_agreement(reference, other) == pytest.approx(2 / 3)
    assert top1_agreement(reference, reference) == 1.0


def test_kl_of_two_known_distributions_with_the_rest_bucket():
    # p = (.5, .3, rest .2), q = (.4, .4, rest .2): KL = .5 ln(.5/.4) + .3 ln(.3/.4) + .2 ln(.2/.2)
    expected = 0.5 * LN(0.5 / 0.4) + 0.3 * LN(0.3 / 0.4)
    got = position_kl({"a": LN(0.5), "b": LN(0.3)}, {"a": LN(0.4), "b": LN(0.4)})
    assert got == pytest.approx(expected, rel=1e-12)
    # the rest bucket counts: q moves mass from the rest onto the top tokens
    shifted = 0.5 * LN(0.5 / 0.45) + 0.3 * LN(0.3 / 0.45) + 0.2 * LN(0.2 / 0.1)
    assert position_kl({"a": LN(0.5), "b": LN(0.3)}, {"a": LN(0.45), "b": LN(0.45)}) == pytest.approx(
        shifted, rel=1e-12
    )


def test_kl_is_zero_for_equal_distributions_and_never_negative():
    top = {"a": LN(0.6), "b": LN(0.25), "c": LN(0.1)}
    assert position_kl(top, dict(top)) == pytest.approx(0.0, abs=1e-15)
    # q puts all the rest's mass on p's tokens: without the rest bucket the sum would be negative
    assert position_kl({"a": LN(0.5)}, {"a": LN(0.99)}) > 0


def test_a_token_missing_from_the_candidates_top_gets_its_last_logprob():
    # the candidate's top-2 lacks "b": it is given the smallest logprob shown (.1)
    expected = 0.5 * LN(0.5 / 0.6) + 0.3 * LN(0.3 / 0.1) + 0.2 * LN(0.2 / 0.3)
    got = position_kl({"a": LN(0.5), "b": LN(0.3)}, {"a": LN(0.6), "z": LN(0.1)})
    assert got == pytest.approx(expected, rel=1e-12)


def test_mean_kl_averages_over_positions():
    p = {"a": LN(0.5), "b": LN(0.3)}
    q = {"a": LN(0.4), "b": LN(0.4)}
    one = position_kl(p, q)
    reference = [[pos("a", {"a": 0.5, "b": 0.3}), pos("a", {"a": 0.5, "b": 0.3})]]
    other = [[pos("a", {"a": 0.5, "b": 0.3}), {"argmax": "a", "top": q, "actual": -1.0}]]
    assert mean_kl(reference, other) == pytest.approx(one / 2)


def test_perplexity_is_exp_of_mean_negative_logprob():
    positions = [[pos("a", {}, actual=-1.0), pos("a", {}, actual=-2.0)], [pos("a", {}, actual=-3.0)]]
    assert perplexity(positions) == pytest.approx(math.exp(2.0))
    assert perplexity([[pos("a", {}, actual=0.0)]]) == 1.0


def test_texts_scored_at_different_lengths_are_refused():
    with pytest.raises(ValueError, match="3 positions against 2"):
        top1_agreement([[pos("a", {"a": 0.5})] * 3], [[pos("a", {"a": 0.5})] * 2])


def test_texts_longer_than_the_context_are_split_into_windows():
    windows, notice = token_windows([list(range(10)), [1, 2, 3]], max_model_len=5)
    assert windows == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [1, 2, 3]]
    assert notice.count("\n") == 0 and "1 of 2 texts are longer than the 5-token context (longest 10 tokens)" in notice
    assert token_windows([[1, 2, 3]], max_model_len=5) == ([[1, 2, 3]], None)
    assert token_windows([[1, 2, 3, 4, 5]], max_model_len=5)[0] == [[1, 2, 3, 4]]  # a lone last token is dropped
