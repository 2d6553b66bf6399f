"""Fixtures for the cluster tests: one real sshd per session, private work dirs, isolated state."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from ray_calib.testing.localnodes import Sshd, SshdUnavailable, kill_leftovers, running_sshd


@pytest.fixture(scope="session")
def sshd() -> Sshd:
    try:
        with running_sshd() as server:
            yield server
    except SshdUnavailable as err:
        pytest.skip(str(err))


@pytest.fixture
def workdir() -> Path:
    """A short private dir under /tmp (Ray's socket paths must stay under 108 bytes); leftovers killed."""
    path = Path(tempfile.mkdtemp(prefix="rc-cluster-", dir="/tmp"))
    yield path
    kill_leftovers(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def state_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setenv("RAY_CALIB_STATE_DIR", str(path))
    return path
