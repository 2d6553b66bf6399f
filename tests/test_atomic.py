"""Atomic writes: readable like a plain open() would make them (umask), secrets only when asked."""

import os
import stat

import pytest

from ray_calib import atomic


def test_results_follow_the_umask_and_secrets_stay_private(tmp_path):
    result = atomic.write_text(tmp_path / "config.json", "{}")
    assert stat.S_IMODE(result.stat().st_mode) == 0o666 & ~atomic._UMASK
    token = atomic.write_bytes(tmp_path / "token", b"secret", mode=0o600)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["config.json", "token"]  # no temp files left


def test_the_umask_is_read_without_being_changed():
    old = os.umask(0o027)
    try:
        assert atomic._read_umask() == 0o027
        assert os.umask(0o027) == 0o027  # still what the process set: reading did not change it
    finally:
        os.umask(old)


def _rank_files(value: float) -> list:
    from ray_calib.inc import RankFile, StatsName

    return [
        RankFile(
            name=StatsName("inc_measure_output", rank=r, world_size=2),
            nodes={"a": {"inputs": [[[value + r]]]}},
            mod_list=["a"],
        )
        for r in range(2)
    ]


def test_a_crash_mid_move_is_seen_by_discover_not_read_as_one_run(tmp_path, monkeypatch):
    """Old rank 1 beside new rank 0 (same prefix and world size) is refused until a complete rewrite."""
    from ray_calib.errors import MeasurementError
    from ray_calib.inc import MeasurementSet, write_rank_file

    out = tmp_path / "measure"
    with atomic.staged_dir(out) as stage:
        for rank_file in _rank_files(1.0):
            write_rank_file(rank_file, stage)
    assert MeasurementSet.discover(out).world_size == 2

    real_replace, moved = os.replace, []

    def crash_after_three(src, dst):  # rank 0's JSON, NPZ and mod_list arrive; then the process dies
        if os.path.dirname(dst) == str(out) and "hooks_maxabs" in str(dst):
            if len(moved) == 3:
                raise KeyboardInterrupt
            moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", crash_after_three)
    with pytest.raises(KeyboardInterrupt), atomic.staged_dir(out) as stage:
        for rank_file in _rank_files(5.0):
            write_rank_file(rank_file, stage)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    with pytest.raises(MeasurementError, match="interrupted") as err:
        MeasurementSet.discover(out)
    assert "re-run" in (err.value.fix or "")

    with atomic.staged_dir(out) as stage:  # a complete rewrite makes the directory one run again
        for rank_file in _rank_files(5.0):
            write_rank_file(rank_file, stage)
    assert [rf.nodes["a"]["inputs"] for rf in MeasurementSet.discover(out).read_all()] == [[[[5.0]]], [[[6.0]]]]


def test_leftovers_are_found_and_a_killed_stage_is_removed_by_the_next(tmp_path):
    from ray_calib import atomic

    (tmp_path / ".model.safetensors.abc.tmp").write_bytes(b"12345")
    (tmp_path / ".fp8.stage-xyz").mkdir()
    (tmp_path / ".fp8.stage-xyz" / "model.safetensors").write_bytes(b"123")
    (tmp_path / "model.safetensors").write_bytes(b"kept")
    (tmp_path / ".hidden-config").write_bytes(b"not ours")
    found = atomic.leftovers(tmp_path)
    assert [(p.name, size) for p, size in found] == [(".fp8.stage-xyz", 3), (".model.safetensors.abc.tmp", 5)]
    with atomic.staged_dir(tmp_path / "fp8") as stage:
        (stage / "a.json").write_text("{}")
    assert not (tmp_path / ".fp8.stage-xyz").exists() and (tmp_path / "fp8" / "a.json").exists()
    assert atomic.remove_leftovers(tmp_path) == (1, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden-config", "fp8", "model.safetensors"]
