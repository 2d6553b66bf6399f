"""Atomic writes: readable like a plain open() would make them (umask), secrets only when asked."""

import os
import stat

from ray_calib import atomic


def test_results_follow_the_umask_and_secrets_stay_private(tmp_path):
    result = atomic.write_text(tmp_path / "config.json", "{}")
    assert stat.S_IMODE(result.stat().st_mode) == 0o666 & ~atomic._UMASK
    token = atomic.write_bytes(tmp_path / "token", b"secret", mode=0o600)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["config.json", "token"]  # no temp files left
