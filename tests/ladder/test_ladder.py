"""`ray-calib ladder`: each rung passes on the two local nodes and fails for the reason it exists."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ray_calib.ladder import nodes
from ray_calib.ladder.nodes import NodeModel, check_memory, check_models
from ray_calib.ladder.run import LadderContext, Rung, RungFailed, run_ladder
from ray_calib.testing.localnodes import ray_pids, write_conf


def probe_locally(model) -> NodeModel:
    """The rung's own node probe, run here as SSH runs it on a node."""
    out = subprocess.run(
        [sys.executable, "-c", nodes._PROBE, str(model), nodes._MARK], capture_output=True, text=True, check=True
    ).stdout
    facts = json.loads(out.strip().removeprefix(nodes._MARK))
    return NodeModel("probe", facts["model"], facts["mem_available"], facts["hbm_free"])


def test_another_copy_of_the_model_on_a_node_fails_rung_a(tmp_path, tiny_model):
    source = tiny_model("llama")
    head = probe_locally(source)
    assert head.digest and head.mem_available and head.hbm_free is None  # no hl-smi here
    other = tmp_path / "other"
    other.mkdir()
    for path in source.iterdir():
        (other / path.name).symlink_to(path)
    assert probe_locally(other).digest == head.digest  # the same files at another place: the same model
    (other / "config.json").unlink()
    config = json.loads((source / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    worker = NodeModel("worker1 (127.0.0.2)", probe_locally(other).digest, head.mem_available, None)
    with pytest.raises(RungFailed, match=r"worker1 \(127.0.0.2\): .* differs from the head's copy") as failed:
        check_models([head, worker], str(source))
    assert "copy the head's" in failed.value.fix
    missing = NodeModel("worker1 (127.0.0.2)", probe_locally(tmp_path / "nowhere").digest, None, None)
    with pytest.raises(RungFailed, match="no config.json under"):
        check_models([head, missing], str(source))


def test_a_card_held_by_another_process_fails_rung_a():
    free = [90 << 30] * 8
    ok = [NodeModel("head", "d", 500 << 30, free), NodeModel("worker1", "d", 400 << 30, free)]
    assert check_memory(ok) == "RAM available >= 400 GiB per node, HBM free >= 90 GiB per card"
    busy = [ok[0], NodeModel("worker1", "d", 400 << 30, [*free[:3], 20 << 30, *free[4:]])]
    with pytest.raises(RungFailed, match="worker1: card 3 has 20.0 GiB HBM free, the freest card 90.0 GiB"):
        check_memory(busy)


def test_the_ladder_stops_at_the_first_failing_rung(tmp_path):
    ran = []

    def passes(context):
        ran.append("a")
        return "fine"

    def fails(context):
        ran.append("b")
        raise RungFailed("worker1", "no rank file _1_2", fix="look at the rank's log")

    rungs = [Rung("a", "one", "", passes), Rung("b", "two", "", fails), Rung("c", "three", "", passes)]
    results = run_ladder(rungs, LadderContext(tmp_path / "devices.conf", None, tmp_path))
    assert ran == ["a", "b"] and [r.ok for r in results] == [True, False]
    assert results[1].result == "worker1: no rank file _1_2" and results[1].fix == "look at the rank's log"


def test_unknown_rungs_are_refused(run_cli, tmp_path):
    result = run_cli("ladder", "--conf", tmp_path / "devices.conf", "--rungs", "z", "--run-dir", tmp_path)
    assert result.exit_code == 2 and "--rungs z: no rung z" in result.stderr


@pytest.mark.cluster
def test_rung_a_green_on_two_local_nodes_then_version_skew_fails_it(workdir, sshd, run_cli, tiny_model, tmp_path):
    """Over real SSH to 127.0.0.1 and 127.0.0.2: green, then the worker's env puts another vLLM first on its
    path (what a node with another image looks like): rung a fails naming that host, the versions and the fix."""
    model = tiny_model("llama")
    conf = write_conf(workdir / "green", sshd, extra=f"WORK_DIR={workdir}\n")
    result = run_cli("ladder", "--conf", conf, "-m", model, "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    assert "a nodes" in result.stdout and "ok: 2 nodes like the head" in result.stdout
    table = (tmp_path / "run" / "ladder" / "ladder.txt").read_text()
    assert table.startswith("rung") and "seconds" in table and "model " in table
    assert json.loads((tmp_path / "run" / "ladder" / "ladder.json").read_text())[0]["ok"] is True

    fake = workdir / "fake-site"
    (fake / "vllm-0.0.1.dist-info").mkdir(parents=True)
    (fake / "vllm-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.0.1\n")
    skewed = write_conf(
        workdir / "skew", sshd, extra=f"WORK_DIR={workdir}\n", worker_env=f'export PYTHONPATH="{fake}"\n'
    )
    result = run_cli("ladder", "--conf", skewed, "-m", model, "--run-dir", tmp_path / "run")
    assert result.exit_code == 1
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert error.startswith("error: ladder rung a nodes: worker1 (127.0.0.2): vllm 0.0.1 != head ")
    assert "install the head's versions on that host" in error
    assert "FAILED: worker1 (127.0.0.2)" in (tmp_path / "run" / "ladder" / "ladder.txt").read_text()
    assert ray_pids(workdir) == []  # rung a starts no Ray process
