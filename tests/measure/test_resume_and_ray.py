"""Crash-safety and placement: a killed worker then --resume, and TP=2 across two real Ray nodes.

Both must reproduce the uninterrupted one-node TP=2 run exactly (same prompts, same batches, and
max-merge of chunk checkpoints is exact).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ray_calib.inc import MeasurementSet, read_meta
from ray_calib.testing.localnodes import free_ports
from tests.measure.conftest import measure_args, measure_env, run_measure

pytestmark = pytest.mark.slow


def same_files(a: Path, b: Path) -> None:
    left, right = MeasurementSet.discover(a).read_all(), MeasurementSet.discover(b).read_all()
    assert [r.name for r in left] == [r.name for r in right]
    for x, y in zip(left, right):
        assert x.nodes == y.nodes, f"rank {x.rank} differs"
        assert x.mod_list == y.mod_list
    assert json.loads((a / "ray_calib_meta.json").read_text())["num_tokens"] == read_meta(b).num_tokens


def children(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


@pytest.mark.extended
def test_killed_worker_then_resume_gives_the_same_files(measured, tiny_models, calib_set, tmp_path):
    reference = measured("llama", 2, True)
    out = tmp_path / "resumed"
    args = measure_args(tiny_models["llama"], calib_set, out, 2, fp8_kv=True)
    proc = subprocess.Popen(args, env=measure_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / ".chunks" / "chunk-00000" / "chunk.json").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
        workers = children(proc.pid)
        assert workers, "mp executor: the ranks run in child processes"
        os.kill(workers[-1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert error_lines and "--resume" in error_lines[-1], stderr[-2000:]
    # stages, progress, measure's own notes, warnings, the error; the worker's traceback goes to the log file
    ours = ("(", "measure: ", "recording hessians for GPTQ", "no hessians", "resuming: ", "warning: ", "error: ")
    assert [line for line in stderr.splitlines() if line.strip() and not line.startswith(ours)] == [], stderr[-3000:]
    done = sorted(p.name for p in (out / ".chunks").glob("chunk-*"))
    assert "chunk-00000" in done and len(done) < 4, done
    resumed = run_measure(args + ["--resume"]).check()
    assert f"{len(done)}/4 chunks reused" in resumed.stdout
    same_files(out, reference.out)


@pytest.fixture
def two_ray_nodes(tmp_path):
    """A head on 127.0.0.1 and a worker on 127.0.0.2, one 'HPU' (= TP rank) each, token auth."""
    temp = Path(tempfile.mkdtemp(prefix="rc-measure-", dir="/tmp"))
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    ray = str(Path(sys.executable).parent / "ray")
    env = {**measure_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    common = [
        "--num-cpus=1",
        '--resources={"HPU": 1}',
        "--memory=3000000000",
        "--object-store-memory=200000000",
        "--disable-usage-stats",
    ]
    port = free_ports(15)  # every port Ray would otherwise take from its fixed defaults
    head = [
        ray,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port[0]}",
        "--include-dashboard=false",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={port[1]}",
        f"--node-manager-port={port[2]}",
        f"--object-manager-port={port[3]}",
        f"--ray-client-server-port={port[4]}",
        f"--dashboard-agent-listen-port={port[5]}",
        f"--dashboard-agent-grpc-port={port[6]}",
        f"--metrics-export-port={port[7]}",
        f"--runtime-env-agent-port={port[8]}",
        f"--temp-dir={temp / 'head'}",
        *common,
    ]
    worker = [
        ray,
        "start",
        f"--address=127.0.0.1:{port[0]}",
        "--node-ip-address=127.0.0.2",
        f"--node-manager-port={port[9]}",
        f"--object-manager-port={port[10]}",
        f"--dashboard-agent-listen-port={port[11]}",
        f"--dashboard-agent-grpc-port={port[12]}",
        f"--metrics-export-port={port[13]}",
        f"--runtime-env-agent-port={port[14]}",
        f"--temp-dir={temp / 'worker'}",
        *common,
    ]
    try:
        subprocess.run(head, env={**env, "VLLM_HOST_IP": "127.0.0.1"}, check=True, capture_output=True, timeout=180)
        subprocess.run(worker, env={**env, "VLLM_HOST_IP": "127.0.0.2"}, check=True, capture_output=True, timeout=180)
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port[0]}"}
    finally:
        stop_processes_under(temp)
        shutil.rmtree(temp, ignore_errors=True)


def stop_processes_under(temp: Path) -> None:
    """End the Ray processes of these two nodes only (their command lines name our private temp dir).

    `ray stop` would end every Ray process on the machine, other users' clusters included.
    """
    import psutil

    for sig in (signal.SIGTERM, signal.SIGKILL):
        ours = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any(str(temp) in part for part in proc.info["cmdline"] or ()):
                ours.append(proc)
                try:
                    proc.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
        psutil.wait_procs(ours, timeout=15)


@pytest.mark.extended
@pytest.mark.cluster
def test_two_ray_nodes_equal_one_node(measured, tiny_models, calib_set, tmp_path, two_ray_nodes):
    reference = measured("llama", 2, True)
    out = tmp_path / "ray-two-nodes"
    run = run_measure(measure_args(tiny_models["llama"], calib_set, out, 2, fp8_kv=True), env=two_ray_nodes).check()
    assert read_meta(out).extra["executor"] == "ray"
    assert "[ray]" in run.stdout
    same_files(out, reference.out)
