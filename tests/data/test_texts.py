"""Real text sets: disjoint calibration/held-out documents, the same passages on every call."""

import json

import pytest

from ray_calib.data import texts
from ray_calib.errors import DataError


@pytest.mark.parametrize("source", texts.SOURCES)
def test_calibration_and_heldout_never_share_a_document(source):
    calibration = dict(texts.split_documents(source, "calibration"))
    heldout = dict(texts.split_documents(source, "heldout"))
    if not calibration or not heldout:
        pytest.skip(f"{source}: no documents on this machine")
    assert not set(calibration) & set(heldout)
    assert set(calibration) | set(heldout) == {name for name, _ in texts.documents(source)}


def test_passages_are_deterministic_and_sized():
    first = texts.sample("pydoc", "heldout", 10)
    assert first == texts.sample("pydoc", "heldout", 10)
    assert all(1200 <= len(p) for p in first)
    calibration = texts.sample("pydoc", "calibration", 10)
    assert not set(first) & set(calibration)


def test_passages_join_short_paragraphs_and_cut_long_ones():
    text = "\n\n".join(["short one."] * 3 + ["word " * 1000])
    pieces = list(texts.passages(text, min_chars=100, max_chars=300))
    assert all(len(p) <= 300 + 40 for p in pieces)  # a cut paragraph plus the short ones before it
    assert pieces[0].startswith("short one.\n\nshort one.")


def test_asking_for_more_passages_than_exist_fails_clearly():
    with pytest.raises(DataError, match="fewer than the 100000 asked for"):
        texts.sample("pydoc", "heldout", 100000)


def test_make_text_set_writes_the_pile_format(tmp_path, run_cli):
    out = tmp_path / "calib.jsonl"
    result = run_cli("make-text-set", "--source", "pydoc", "--split", "calibration", "--num-samples", 5, "--out", out)
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(set(r) == {"text"} for r in rows)


def test_eval_default_texts_are_held_out_and_of_a_meaningful_size():
    heldout, note = texts.default_heldout()
    calibration = set(texts.sample("pydoc", "calibration", 16))
    assert len(heldout) == 16 and not calibration & set(heldout)
    assert sum(len(t) for t in heldout) > 16 * 1200 and "16 held-out passages" in note
