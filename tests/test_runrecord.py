"""run.json: facts decided once, flags checked against them, one answer for "which unified directory"."""

from __future__ import annotations

import json

import pytest

from ray_calib.rundir import RunDir
from ray_calib.runrecord import (
    RECORD_FILE,
    RunFactError,
    check_rank_files,
    decide,
    read_record,
    record_facts,
    run_measurements,
    start_record,
)


def _record(tmp_path, **facts):
    (tmp_path / "measure").mkdir(exist_ok=True)
    files = []
    for rank in range(2):
        path = tmp_path / "measure" / f"m_hooks_maxabs_{rank}_2.json"
        path.write_text(json.dumps({"rank": rank}))
        files.append(path)
    return start_record(tmp_path, "run-a", "measure", {"fp8_kv": True, "measured_tp": 2, **facts}, files)


def test_a_flag_takes_the_recorded_default_and_a_contradiction_is_one_line(tmp_path):
    record = _record(tmp_path)
    assert decide(record, "fp8_kv", None, flag="--fp8-kv", stage="quantize", override=False).value is True
    assert decide(record, "fp8_kv", True, flag="--fp8-kv", stage="quantize", override=False).override is None
    with pytest.raises(RunFactError) as err:
        decide(record, "fp8_kv", False, flag="--no-fp8-kv", stage="quantize", override=False)
    line = str(err.value)
    assert "\n" not in line
    for part in ("--no-fp8-kv", "fp8_kv = true", "decided by measure", "new run", "--override-run"):
        assert part in line, line
    assert decide(None, "fp8_kv", False, flag="--no-fp8-kv", stage="quantize", override=False).value is False


def test_an_override_is_recorded_beside_the_fact(tmp_path):
    record = _record(tmp_path)
    decision = decide(record, "fp8_kv", False, flag="--no-fp8-kv", stage="quantize", override=True)
    record_facts(record, "quantize", {"fp8_kv": decision.value}, [decision.override])
    again = read_record(tmp_path)
    assert again is not None and again.value("fp8_kv") is False and again.by("fp8_kv") == "quantize"
    assert again.overrides == [{"fact": "fp8_kv", "was": True, "now": False, "by": "quantize", "flag": "--no-fp8-kv"}]
    assert again.run_id == "run-a" and again.value("measured_tp") == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left beside it


def test_a_damaged_record_is_one_line(tmp_path):
    (tmp_path / RECORD_FILE).write_text("{")
    with pytest.raises(RunFactError, match="not a readable run record"):
        read_record(tmp_path)


def test_the_target_tp_wins_over_a_leftover_unified_directory(tmp_path):
    """The chain: unify --to-tp 8 (the run's target), then a one-off --to-tp 1: TP 1 used to win (smallest)."""
    run = RunDir(tmp_path)
    record = _record(tmp_path)
    for tp in (8, 1):
        run.unified(tp).mkdir()
    with pytest.raises(RunFactError, match="several unified directories") as err:
        run_measurements(run)
    assert "unified-tp1, unified-tp8" in str(err.value) and "--measurements" in str(err.value)
    record_facts(record, "unify", {"target_tp": 8})
    assert run_measurements(run) == run.unified(8)
    record_facts(record, "unify", {"target_tp": 4})
    with pytest.raises(RunFactError, match="records target TP 4, but .*unified-tp4 is missing"):
        run_measurements(run)


def test_one_unified_directory_or_none(tmp_path):
    run = RunDir(tmp_path)
    assert run_measurements(run) is None
    run.unified(2).mkdir()
    assert run_measurements(run) == run.unified(2)


def test_rank_files_of_another_run_are_refused(tmp_path):
    record = _record(tmp_path)
    files = sorted((tmp_path / "measure").glob("*.json"))
    check_rank_files(record, tmp_path / "measure", "run-a", files)
    with pytest.raises(RunFactError, match="belong to run run-b, .* is run run-a"):
        check_rank_files(record, tmp_path / "measure", "run-b", files)
    files[1].write_text(json.dumps({"rank": 1, "of": "another run"}))
    with pytest.raises(RunFactError, match="m_hooks_maxabs_1_2.json: its sha256 differs"):
        check_rank_files(record, tmp_path / "measure", "run-a", files)
    stranger = tmp_path / "measure" / "m_hooks_maxabs_2_3.json"
    stranger.write_text("{}")
    with pytest.raises(RunFactError, match="not a rank file of run run-a"):
        check_rank_files(record, tmp_path / "measure", None, [stranger])
