"""The command line itself: help everywhere, version, and no heavy imports on the fast paths."""

import subprocess
import sys
import time

import pytest

from ray_calib.cli import COMMANDS, cli

HEAVY = (
    "torch",
    "vllm",
    "ray",
    "transformers",
    "safetensors",
    "huggingface_hub",
    "paramiko",
    "matplotlib",
    "pandas",
    "numpy",
)


def test_version(run_cli):
    from ray_calib import __version__

    result = run_cli("--version")
    assert result.exit_code == 0 and __version__ in result.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(run_cli, name):
    result = run_cli(name, "--help")
    assert result.exit_code == 0, result.stderr
    assert "Usage: ray-calib" in result.stdout and name in result.stdout


def test_group_help_lists_every_command_in_pipeline_order(run_cli):
    result = run_cli("--help")
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ") and line.split()]
    listed = [name for name in listed if name in COMMANDS]
    assert listed == list(COMMANDS) and set(cli.list_commands(None)) == set(COMMANDS)
    stages = ["up", "measure", "unify", "quantize", "infer", "eval", "report", "push"]
    assert [listed.index(name) for name in stages] == sorted(listed.index(name) for name in stages)
    assert "On one box, no cluster" in result.stdout
    alone = run_cli()
    assert alone.exit_code == 0 and alone.stdout == result.stdout


def test_unknown_option_is_one_line_usage_error(run_cli):
    result = run_cli("unify", "--to-tp", "two")
    assert result.exit_code == 2 and "Invalid value for '--to-tp'" in result.stderr


def _imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint('MODULES', *sorted({{m.split('.')[0] for m in sys.modules}}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(out.rsplit("MODULES", 1)[1].split())


def test_help_and_unify_import_nothing_heavy(tmp_path):
    from tests.measurements.synthetic import write_set

    write_set(tmp_path / "in", 2)
    loaded = _imported_after(
        "from ray_calib.cli import main\n"
        "for args in (['--help'], ['unify', '--help'], "
        f"['unify', '--to-tp', '1', '--in', r'{tmp_path / 'in'}', '--out', r'{tmp_path / 'out'}']):\n"
        "    try: main(args)\n"
        "    except SystemExit as e: assert e.code == 0, e.code\n"
    )
    assert (tmp_path / "out").is_dir()
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_ctrl_c_says_what_was_kept_and_how_to_go_on(run_cli, monkeypatch, tmp_path):
    """No bare "Aborted.": the default line says nothing is half-written and gives the rerun command;
    a command that keeps work (measure's checkpoints) says what it kept and the resume command."""
    from ray_calib import ui

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ray_calib.cli.measurements.inspect_dir", interrupted)
    result = run_cli("inspect", tmp_path)
    assert result.exit_code == 130 and "Aborted" not in result.stderr
    assert result.stderr.strip().endswith(f"to start again: ray-calib inspect {tmp_path}"), result.stderr

    ui.set_command_line(["measure", "-m", "M", "-d", "D", "--force"])
    ui.on_interrupt(lambda: f"kept 2 chunks; resume with: {ui.rerun_command(add=['--resume'], drop=['--force'])}")
    assert ui.interrupted_message() == "interrupted: kept 2 chunks; resume with: ray-calib measure -m M -d D --resume"


@pytest.mark.parametrize(
    "module",
    [
        "ray_calib.cli",
        "ray_calib.testing.demo",
        "ray_calib.testing.hub_standin",
        pytest.param("ray_calib.infer.vllm_cli", marks=pytest.mark.slow),  # imports vLLM: ~20 s
    ],
)
def test_every_python_m_entry_point_honours_help(module):
    """`--help` prints usage and exits 0 at once: it never starts what the module runs (the demo did)."""
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower()


def test_an_interrupted_demo_stage_that_will_not_stop_is_killed_with_its_children(tmp_path):
    """The demo's Ctrl-C clean-up is bounded: a stage that ignores SIGINT (as a hung engine shutdown would) is
    killed after the grace time together with the processes below it, and the interrupt goes on to `down`."""
    script = (
        "import os, signal, sys, threading\n"
        "from ray_calib.testing import demo\n"
        "demo.STOP_GRACE_S = 1\n"
        # to the main thread itself: a process-wide signal may land on the timer's thread and leave the main
        # thread asleep in waitpid (Ctrl-C reaches a demo that has no other thread)
        "main = threading.get_ident()\n"
        "threading.Timer(2, lambda: signal.pthread_kill(main, signal.SIGINT)).start()\n"
        "stage = ['sh', '-c', 'trap \"\" INT; sleep 600 & echo $! > %s; wait']\n"
        "try:\n"
        "    demo._run_to_the_end(stage)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(7)\n"
    ) % (tmp_path / "grandchild")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], timeout=60)
    grandchild = int((tmp_path / "grandchild").read_text())
    assert done.returncode == 7 and time.monotonic() - started < 30
    time.sleep(0.5)
    assert not _alive(grandchild), "the stage's child outlived the kill"


def test_the_demos_speed_probe_prints_no_traceback_under_its_sigterm_handler():
    """The demo turns SIGTERM into Ctrl-C before it probes the CPU; the probe pool's workers, ended with
    SIGTERM, must not inherit that (each printed a KeyboardInterrupt traceback into the demo's output)."""
    script = (
        "import signal\n"
        "from ray_calib.testing import demo\n"
        "signal.signal(signal.SIGTERM, demo._terminated)\n"
        "print(demo.speed_factor())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and float(done.stdout) > 0
    assert "Traceback" not in done.stderr, done.stderr


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
