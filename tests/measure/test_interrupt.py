"""Ctrl-C / SIGTERM during `measure` and `eval`: every process the command started ends with it, nothing
half-written stays, and the last line says what was kept and how to go on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.measure.conftest import REPO, measure_env

psutil = pytest.importorskip("psutil")
pytestmark = [pytest.mark.slow, pytest.mark.extended]  # ~75 s: CI runs them in the extended tier


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ray_calib.cli", *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own session: whatever is left of it is found by session id
    )


def wait_for(proc: subprocess.Popen, done, timeout: float = 300) -> list[str]:
    """stderr lines until `done(line)` (or fail when the command ends first)."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            pytest.fail(f"ended before the point to interrupt it:\n{''.join(lines)[-3000:]}")
        lines.append(line)
        if done(line):
            return lines
    pytest.fail("never reached the point to interrupt it")


def interrupt(proc: subprocess.Popen, signum: int) -> tuple[list[int], str, str]:
    """Send `signum` to the command alone (not its children), wait; (its descendants before, stdout, stderr)."""
    before = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    started = time.monotonic()
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=240)  # a loaded 2-core box: the engine core and workers unwind slowly
    print(f"signal {signum}: exit {proc.returncode} after {time.monotonic() - started:.1f} s, {len(before)} children")
    return before, stdout, stderr


def left_of(proc: subprocess.Popen, children: list[int]) -> list[str]:
    """Processes of the command's session or among its children that still run."""
    time.sleep(1)
    alive = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid in children or os.getsid(p.pid) == proc.pid:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:120]}")
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            pass
    return alive


def test_sigint_during_measure_ends_engine_core_and_workers_and_says_how_to_resume(tiny_model, tmp_path):
    from ray_calib.testing.tiny.calibset import make_calib_set

    data = make_calib_set("pile", tmp_path / "pile.jsonl", num_samples=256)
    out = tmp_path / "run" / "measure"
    env = {k: v for k, v in measure_env().items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # engine core process
    env["RAY_CALIB_RUN_DIR"] = str(out.parent)
    # 64 chunks: on a loaded box the run must still be measuring when the first chunk is seen
    args = ["measure", "-m", tiny_model("llama"), "-d", data, "-t", 2, "-n", 256, "-l", 24, "-b", 4]
    proc = start([*args, "--chunk-size", 4, "--max-new-tokens", 16, "-o", out, "--no-hessians"], env)
    wait_for(proc, lambda line: line.startswith("(3/4 "))
    deadline = time.monotonic() + 120
    while not list((out / ".chunks").glob("chunk-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "measure finished before it could be interrupted"
    children, stdout, stderr = interrupt(proc, signal.SIGINT)
    assert len(children) >= 3, children  # engine core, two TP workers (and the resource tracker)
    assert left_of(proc, children) == []
    assert proc.returncode == 130 and stdout == ""
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: kept ") and f"finished chunks (4 prompts each) in {out / '.chunks'}" in last
    assert "resume with: ray-calib measure -m " in last and last.count(" --resume") == 1
    assert "Traceback" not in stderr and "Aborted" not in stderr
    assert not list(out.rglob("*.tmp")) and not list((out / ".chunks").glob(".chunk-*"))
    print(f"measure SIGINT: {last}")


def test_sigterm_during_eval_ends_its_scoring_process(tiny_model, tmp_path):
    model = tiny_model("llama")
    env = {**measure_env(), "RAY_CALIB_RUN_DIR": str(tmp_path / "run")}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
    proc = start(["eval", "--baseline", model, "--candidate", model, "--no-fp8-kv", "--enforce-eager"], env)
    wait_for(proc, lambda line: line.startswith("(1/2 score baseline)"))
    time.sleep(3)  # the scoring process is starting its engine
    children, stdout, stderr = interrupt(proc, signal.SIGTERM)
    assert children and left_of(proc, children) == []
    assert proc.returncode == 143 and stdout == ""
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted; no output is left half-written") and "to start again: ray-calib eval" in last
    assert not (tmp_path / "run" / "eval.json").exists() and "Traceback" not in stderr
    print(f"eval SIGTERM: {last}")
