"""`down` keeps the cluster's state when a node could not be stopped, so `status` and a rerun still know it."""

from __future__ import annotations

import pytest

from ray_calib.cluster import devices, lifecycle, state
from ray_calib.errors import ClusterError
from ray_calib.testing.localnodes import WORKER_IP, write_conf

pytestmark = pytest.mark.cluster


def test_partial_down_keeps_the_state_and_a_clean_down_removes_it(workdir, sshd, state_dir):
    unreachable = write_conf(workdir / "a", sshd, extra="WORKER_NODE_SSH_PORT=1\n")
    state.write(unreachable, {"status": "up", "conf": str(unreachable)})
    with pytest.raises(ClusterError, match=rf"Ray may still run on worker1 \({WORKER_IP}\)"):
        lifecycle.down(devices.load(unreachable))
    assert state.read(unreachable)["status"] == "up"  # `status` still knows the cluster; a rerun can retry

    reachable = write_conf(workdir / "b", sshd)
    state.write(reachable, {"status": "up", "conf": str(reachable)})
    lifecycle.down(devices.load(reachable))
    assert state.read(reachable) is None
