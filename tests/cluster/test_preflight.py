"""Preflight stops `up` before any Ray process starts, naming the host and what differs."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from ray_calib.testing.localnodes import ray_pids, write_conf

OLD_IPS = {"head_ip": "127.0.0.1", "worker_ip": "127.0.0.2"}  # preflight fails before any Ray starts
pytestmark = pytest.mark.cluster


def _other_python(workdir):
    """A bin dir whose python3 is the system interpreter (no Ray, another patch version)."""
    alt = workdir / "altbin"
    alt.mkdir()
    os.symlink("/usr/bin/python3", alt / "python3")
    return alt


def test_version_mismatch_stops_up_and_names_the_node(workdir, sshd, state_dir, run_cli):
    if not os.path.exists("/usr/bin/python3") or os.path.realpath("/usr/bin/python3") == os.path.realpath(
        sys.executable
    ):
        pytest.skip("needs a second Python interpreter at /usr/bin/python3")
    alt = _other_python(workdir)
    conf = write_conf(workdir, sshd, worker_env=f'export PATH="{alt}:$PATH"\n', **OLD_IPS)
    result = run_cli("up", "--conf", conf)
    assert result.exit_code == 1
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))  # after the stages
    assert error.startswith("error: worker1 (127.0.0.2): preflight failed: ")
    assert f"ray not installed for {alt}/python3" in error and "torch missing != head 2.13.0" in error
    system_python = subprocess.run(
        ["/usr/bin/python3", "-c", "import platform; print(platform.python_version())"], capture_output=True, text=True
    ).stdout.strip()
    if system_python != platform.python_version():
        assert f"python {system_python} != head {platform.python_version()}" in error
    assert "(2/5 preflight)" in result.stderr and "(3/5" not in result.stderr  # stages go to stderr
    assert "head (127.0.0.1)" in result.stdout and "ok" in result.stdout  # the table has a row per host
    assert ray_pids(workdir) == []  # nothing was started


def test_wrong_ifname_and_missing_work_dir(workdir, sshd, state_dir, run_cli):
    conf = write_conf(workdir, sshd, extra=f"WORK_DIR={workdir}/nowhere\n", **OLD_IPS)
    conf.write_text(conf.read_text().replace("WORKER_NODE_IFNAME=lo", "WORKER_NODE_IFNAME=eth0"))
    result = run_cli("up", "--conf", conf)
    assert result.exit_code == 1
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))  # after the stages
    assert error.startswith(f"error: head (127.0.0.1): preflight failed: work dir {workdir}/nowhere missing")
    assert "| worker1 (127.0.0.2): eth0 does not hold 127.0.0.2" in error
    assert ray_pids(workdir) == []


def _node(kind: str):
    from ray_calib.cluster.devices import NodeConfig

    return NodeConfig(
        name="head",
        role="head",
        ip="127.0.0.1",
        ifname=None,
        source_file=None,
        ssh_host="127.0.0.1",
        ssh_user="root",
        ssh_port=22,
        ssh_key=None,
        device_kind=kind,
        devices=8,
        python="python3",
        temp_dir="/tmp/x",
        num_cpus=None,
        memory=None,
        object_store_memory=None,
        line=1,
    )


@pytest.mark.parametrize("kind,present,problem", [("cpu", 2, None), ("hpu", 2, "8 hpu devices configured, 2 present")])
def test_cpu_ranks_may_outnumber_cores_but_accelerators_must_be_there(kind, present, problem):
    """A CPU 'device' is a rank process: TP=16 over two 2-core nodes runs (slowly); 8 missing Gaudis do not."""
    from types import SimpleNamespace

    from ray_calib.cluster.preflight import judge

    node = _node(kind)
    facts = {
        "packages": {"ray": "2.60.0", "ray-calib": "0.1.0"},
        "devices": {kind: present},
        "ifaces": {},
        "work_dir": True,
        "free_gb": 100.0,
        "python": "3.11",
        "executable": "python3",
        "gaudi": {"names": ["HL-225"] * present, "driver": ["1.22.0"]} if kind == "hpu" else None,
    }
    problems = judge(node, facts, {}, SimpleNamespace(work_dir="/w", min_free_disk_gb=1))
    assert problems == ([problem] if problem else [])


OLD_RAY = "2.51.1"  # the last Ray before token authentication (2.52), as older Gaudi images may carry


@pytest.fixture(scope="module")
def old_ray_python(tmp_path_factory):
    """A Python with the real Ray 2.51.1 installed from PyPI (uv's cache makes reruns instant)."""
    venv = tmp_path_factory.mktemp("old-ray") / "venv"
    uv = os.path.join(os.path.dirname(sys.executable), "uv")
    subprocess.run([uv, "venv", "-q", "-p", sys.executable, str(venv)], check=True)
    install = subprocess.run(
        [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), f"ray=={OLD_RAY}"],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, f"could not install ray=={OLD_RAY} from PyPI: {install.stderr[-2000:]}"
    return venv / "bin" / "python"


def _probe_with(python, workdir) -> dict:
    import json

    from ray_calib.cluster.preflight import _MARK, _PROBE, PACKAGES

    out = subprocess.run(
        [str(python), "-c", _PROBE, json.dumps(PACKAGES), str(workdir), _MARK], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1].removeprefix(_MARK))


@pytest.mark.slow
def test_a_ray_without_token_authentication_is_refused_by_preflight_and_status(old_ray_python, tmp_path):
    """Against the real API of Ray 2.51.1: preflight's node probe finds no token authentication there (it
    would ignore RAY_AUTH_MODE=token and serve its ports to anyone), and a driver on that Ray gets one line
    naming the version instead of an ImportError traceback. Ray 2.60 (ours) has it."""
    from types import SimpleNamespace

    from ray_calib.cluster.preflight import TOKEN_AUTH_FIX, judge, no_token_auth

    old = _probe_with(old_ray_python, tmp_path)
    assert old["packages"]["ray"] == OLD_RAY and old["ray_token_auth"] is False
    assert _probe_with(sys.executable, tmp_path)["ray_token_auth"] is True
    problem = no_token_auth(OLD_RAY)
    assert problem.startswith(f"ray {OLD_RAY} has no token authentication (RAY_AUTH_MODE=token, ray >= 2.52")
    config = SimpleNamespace(work_dir=str(tmp_path), min_free_disk_gb=0)
    assert f"{problem}: {TOKEN_AUTH_FIX}" in judge(_node("cpu"), old, old, config)

    driver = subprocess.run(
        [
            str(old_ray_python),
            "-c",
            "from ray_calib.cluster.health import _reload_ray_auth\n"
            "from ray_calib.errors import RayCalibError\n"
            "try:\n    _reload_ray_auth()\nexcept RayCalibError as err:\n    print(err.message, '|', err.fix)",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert driver.returncode == 0, driver.stderr[-2000:]
    assert (
        driver.stdout.strip()
        == f"this machine: {problem} | install ray>=2.52 on every node (the same version everywhere)"
    )
