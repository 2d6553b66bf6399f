"""`up` -> `status` -> connect -> restart -> a node dies -> `down`, with real sshd and real Ray.

One two-node cluster (head 127.0.0.3, worker 127.0.0.4, one "HPU" each) goes through one scenario: each
step needs the state the step before left, so they are the named steps of one test (no order between tests,
any `-k` selection or random order works); the fixture takes the cluster down and kills leftovers by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ray_calib.cluster import connect, devices, lifecycle, state
from ray_calib.errors import ClusterError
from ray_calib.testing.localnodes import HEAD_IP, WORKER_IP, kill_leftovers, ray_pids, raylet_pid, write_conf

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(sshd):
    root = Path(tempfile.mkdtemp(prefix="rc-cluster-", dir="/tmp"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_CALIB_STATE_DIR", str(root / "state"))
        conf = write_conf(root, sshd, memory="3G")  # vLLM ranks ask Ray for memory
        try:
            yield conf
        finally:
            try:
                lifecycle.down(devices.load(conf))
            except ClusterError:
                pass
            kill_leftovers(root)
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def clean_env():
    """A step's changes to os.environ (connect sets RAY_ADDRESS) end with the step."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _a_head_ray_moves_off_its_ip_stops_up(cluster, run_cli):
    """HEAD_NODE_IP=127.0.0.1: Ray runs the head on the host's primary address; `up` names both and stops Ray."""
    wrong = cluster.parent / "wrong-head.conf"
    wrong.write_text(cluster.read_text().replace(f"HEAD_NODE_IP={HEAD_IP}", "HEAD_NODE_IP=127.0.0.1"))
    result = run_cli("up", "--conf", wrong)
    assert result.exit_code == 1, result.stderr
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert error.startswith("error: head (127.0.0.1): not bound where configured: Ray runs it on "), error
    chosen = error.split("Ray runs it on ", 1)[1].split(",")[0]
    assert chosen != "127.0.0.1" and "not the configured 127.0.0.1" in error
    assert "(Ray stopped again on every node)" in error and "set HEAD_NODE_IP to another address" in error
    assert ray_pids(cluster.parent / "ray") == [], "nothing keeps listening on the wrong address"


def listening(temp_dir: Path) -> list[tuple[str, str, int]]:
    """(process, ip, port) of every listening TCP socket of one node's Ray processes and their children."""
    return listening_of(*ray_pids(temp_dir))


def listening_of(*pids: int) -> list[tuple[str, str, int]]:
    """(process, ip, port) of every listening TCP socket of these processes and their children."""
    import psutil

    procs = set()
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(pid)
            procs |= {proc, *proc.children(recursive=True)}
    found = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            found += [
                (proc.name(), c.laddr.ip, c.laddr.port)
                for c in proc.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            ]
    return sorted(found)


def _every_port_on_the_node_ip_or_loopback(cluster) -> None:
    """No wildcard (0.0.0.0, ::) or foreign address among the listening sockets of either node."""
    for node, ip in (("head", HEAD_IP), ("worker", WORKER_IP)):
        found = listening(cluster.parent / "ray" / node)
        allowed = {ip, f"::ffff:{ip}", "127.0.0.1", "::ffff:127.0.0.1", "::1"}
        assert len(found) >= 3, found  # at least the raylet's two ports and the agent's
        assert [f for f in found if f[1] not in allowed] == [], found


def _up_then_status(cluster, run_cli):
    result = run_cli("up", "--conf", cluster)
    assert result.exit_code == 0, result.stderr
    for index, name in enumerate(lifecycle.STAGES, start=1):
        assert f"({index}/5 {name})" in result.stderr  # stages go to stderr, results to stdout
    assert f"cluster up at {devices.load(cluster).address} (2 nodes)" in result.stdout
    worker_env = _environ(raylet_pid(cluster.parent / "ray" / "worker"))
    assert worker_env["VLLM_HOST_IP"] == WORKER_IP and worker_env["GLOO_SOCKET_IFNAME"] == "lo"
    assert worker_env["RAY_AUTH_MODE"] == "token"
    token = (cluster.parent / "auth_token").read_text()
    assert len(token) == 64 and stat.S_IMODE((cluster.parent / "auth_token").stat().st_mode) == 0o600
    logs = "".join(p.read_text() for p in state.log_dir(cluster).glob("*.log"))
    assert token not in logs and token not in result.stdout + result.stderr

    shown = run_cli("status", "--conf", cluster)
    assert shown.exit_code == 0, shown.stderr
    record, rows = lifecycle.status(devices.load(cluster))
    assert record["status"] == "up" and [r.alive for r in rows] == [True, True]
    assert rows[0].ray_ip == HEAD_IP and rows[1].ray_ip == WORKER_IP and rows[0].devices == "cpu x1"
    assert record["nodes"][0]["packages"]["ray"] == "2.60.0"
    _every_port_on_the_node_ip_or_loopback(cluster)


def _up_again_is_a_noop(cluster, run_cli):
    before = raylet_pid(cluster.parent / "ray" / "head")
    result = run_cli("up", "--conf", cluster)
    assert result.exit_code == 0 and "nothing to do" in result.stdout
    assert raylet_pid(cluster.parent / "ray" / "head") == before


def _connect_gives_a_working_authenticated_address(cluster):
    address = connect(cluster)
    assert address == devices.load(cluster).address and os.environ["RAY_ADDRESS"] == address
    probe = "import json, ray; ray.init(); print(json.dumps(ray.cluster_resources()))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["HPU"] == 2.0


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tiny_model):
    from ray_calib.testing.tiny.calibset import make_calib_set

    root = tmp_path_factory.mktemp("tiny")
    return tiny_model("llama"), make_calib_set("pile", root / "pile.jsonl", num_samples=8)


def _measure(
    conf: Path, model: Path, dataset: Path, out: Path, tp: int = 2, *extra: str, seen: set | None = None
) -> subprocess.CompletedProcess:
    """`ray-calib measure --conf conf` at TP=`tp` as a user runs it after `up` (fresh process env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VLLM_"))}
    env.update(
        RAY_CALIB_STATE_DIR=os.environ["RAY_CALIB_STATE_DIR"],
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        RAY_CALIB_DEVICE="cpu",
        PYTHONUNBUFFERED="1",
        RAY_CALIB_RUN_DIR=str(out.parent),
    )
    args = [
        sys.executable,
        "-m",
        "ray_calib.cli",
        "measure",
        "--conf",
        str(conf),
        "-m",
        str(model),
        "-d",
        str(dataset),
        "-t",
        str(tp),
        "-n",
        "4",
        "-l",
        "16",
        "-b",
        "2",
        "--chunk-size",
        "4",
        "--max-new-tokens",
        "1",
        "-o",
        str(out),
        "--fp8-kv",
        *extra,
    ]
    if seen is None:
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=480)
    # While it runs, note every listening socket of both nodes' processes and of the driver (vLLM's included).
    with subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        import threading

        out: dict[str, str] = {}
        reader = threading.Thread(target=lambda: out.update(zip(("stdout", "stderr"), proc.communicate(timeout=480))))
        reader.start()
        while reader.is_alive():
            for node, ip in (("head", HEAD_IP), ("worker", WORKER_IP)):
                seen.update((node, ip, *s) for s in listening(conf.parent / "ray" / node))
            seen.update(("driver", HEAD_IP, *s) for s in listening_of(proc.pid))
            time.sleep(0.2)
        reader.join()
        return subprocess.CompletedProcess(args, proc.returncode, out.get("stdout", ""), out.get("stderr", ""))


def _measure_at_tp2_one_rank_per_node(cluster, tiny_llama, tmp_path):
    from ray_calib.inc import MeasurementSet, read_meta

    model, dataset = tiny_llama
    idle = {
        (n, ip, *s)
        for n, ip in (("head", HEAD_IP), ("worker", WORKER_IP))
        for s in listening(cluster.parent / "ray" / n)
    }
    seen: set = set()
    run = _measure(cluster, model, dataset, tmp_path / "measure", 2, "--no-hessians", seen=seen)
    assert run.returncode == 0, run.stderr[-3000:]
    assert seen - idle, sorted(seen)  # the rank workers (Ray workers running vLLM) opened ports of their own
    _streams_are_ours_alone(run)
    wrong = sorted(s for s in seen if s[3] not in {s[1], f"::ffff:{s[1]}", "127.0.0.1", "::ffff:127.0.0.1", "::1"})
    assert wrong == [], wrong
    assert "[ray]" in run.stdout and read_meta(tmp_path / "measure").extra["executor"] == "ray"
    ranks = MeasurementSet.discover(tmp_path / "measure").read_all()
    assert [r.rank for r in ranks] == [0, 1] and all(r.nodes for r in ranks)
    assert not list((tmp_path / "measure").glob("hessians_*"))  # a small model records them unless --no-hessians
    _every_port_on_the_node_ip_or_loopback(cluster)  # the rank workers' ports too, while Ray keeps them


# What `measure` prints: results on stdout, our stages, progress, notes and warnings on stderr; Ray's and
# vLLM's lines (workers, raylet, engine core, `*** SIGTERM received`) belong in <run-dir>/logs/measure.log.
RESULT_LINES = (r"\S+ \[pile\]: \d+ read", r"measured \d+ prompts ", r"observed under ", r"wrote \d+ rank files ")
OUR_LINES = (
    r"\(\d/\d [a-z ,]+\)",
    r"measure: \d+/\d+ prompts",
    r"resuming: ",
    r"recording hessians|no hessians",
    r"warning: ",
)


def _streams_are_ours_alone(run) -> None:
    import re

    assert run.stdout.strip() and run.stderr.strip()
    for stream, patterns in ((run.stdout, RESULT_LINES), (run.stderr, OUR_LINES)):
        for line in stream.splitlines():
            assert any(re.match(p, line) for p in patterns), f"not ours: {line!r}\n{stream[-3000:]}"


def _a_tp_above_the_devices_fails_at_once(cluster, tiny_llama, tmp_path):
    """Two nodes with one device each: -t 4 is refused right after joining, before any prompt is read."""
    out = tmp_path / "measure"
    run = _measure(cluster, *tiny_llama, out, tp=4)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, run.stderr[-2000:]
    assert errors[0].startswith(
        "error: --tp 4 needs 4 devices but the Ray cluster offers 2; use --tp 1 | 2, "
        "or add nodes/devices (ray-calib up) (vLLM/Ray log: "
    ), errors[0]  # names the log
    assert errors[0].endswith("/logs/measure.log)"), errors[0]
    assert "measured" not in run.stdout and not out.exists()


def _env_change_needs_restart(cluster, run_cli):
    env_file = cluster.parent / "worker_env.sh"
    env_file.write_text(env_file.read_text() + "export RC_CLUSTER_MARK=second\n")
    refused = run_cli("up", "--conf", cluster)
    assert refused.exit_code == 1
    assert f"changed: worker1 env file {env_file}" in refused.stderr and "up --restart" in refused.stderr
    with pytest.raises(ClusterError, match="up --restart"):
        connect(cluster)
    restarted = run_cli("up", "--conf", cluster, "--restart")
    assert restarted.exit_code == 0, restarted.stderr
    assert _environ(raylet_pid(cluster.parent / "ray" / "worker"))["RC_CLUSTER_MARK"] == "second"
    assert connect(cluster) == devices.load(cluster).address


def _dead_node_is_named_by_status_connect_and_measure(cluster, run_cli, tiny_llama, tmp_path):
    os.kill(raylet_pid(cluster.parent / "ray" / "worker"), signal.SIGKILL)
    config = devices.load(cluster)
    deadline = time.monotonic() + 60
    while lifecycle.status(config)[1][1].alive:
        assert time.monotonic() < deadline, "GCS never marked the killed worker dead"
        time.sleep(1)
    shown = run_cli("status", "--conf", cluster)
    assert shown.exit_code == 1 and f"worker1 ({WORKER_IP})" in shown.stderr and "not alive" in shown.stderr
    with pytest.raises(ClusterError) as err:
        connect(cluster)
    assert str(err.value).startswith(f"worker1 ({WORKER_IP}): Ray node(s) not alive")
    assert f"{WORKER_IP}:{cluster.parent}/ray/worker/session_latest/logs" in str(err.value)
    refused = _measure(cluster, *tiny_llama, tmp_path / "measure")
    assert refused.returncode != 0 and f"error: worker1 ({WORKER_IP}): Ray node(s) not alive" in refused.stderr
    assert "Traceback" not in refused.stderr


def _down_stops_every_process(cluster, run_cli):
    assert ray_pids(cluster.parent / "ray")  # the head (and worker leftovers) still run
    result = run_cli("down", "--conf", cluster)
    assert result.exit_code == 0, result.stderr
    assert ray_pids(cluster.parent / "ray") == []
    assert not state.state_path(cluster).exists()
    assert "no cluster started" in run_cli("status", "--conf", cluster).stdout


@pytest.mark.timeout(1800)
def test_up_status_connect_measure_restart_dead_node_down(cluster, run_cli, tiny_llama, tmp_path):
    steps = [
        lambda: _a_head_ray_moves_off_its_ip_stops_up(cluster, run_cli),
        lambda: _up_then_status(cluster, run_cli),
        lambda: _up_again_is_a_noop(cluster, run_cli),
        lambda: _connect_gives_a_working_authenticated_address(cluster),
        lambda: _measure_at_tp2_one_rank_per_node(cluster, tiny_llama, tmp_path / "measure-up"),
        lambda: _a_tp_above_the_devices_fails_at_once(cluster, tiny_llama, tmp_path / "too-big"),
        lambda: _env_change_needs_restart(cluster, run_cli),
        lambda: _dead_node_is_named_by_status_connect_and_measure(cluster, run_cli, tiny_llama, tmp_path / "dead"),
        lambda: _down_stops_every_process(cluster, run_cli),
    ]
    for step in steps:
        with clean_env():
            step()
