"""One CLI vocabulary: shared options spelled once, old spellings warned but working, log files named in errors."""

from __future__ import annotations

import sys
import types

import click
import pytest

from ray_calib import cli, ui
from ray_calib.cli import options
from ray_calib.errors import EngineError


def _commands():
    for name in cli.COMMANDS:
        command = cli.cli.get_command(None, name)
        yield from ((f"{name} {sub}", c) for sub, c in getattr(command, "commands", {}).items())
        if not isinstance(command, click.Group):
            yield name, command


SHARED = {"--tp": "-t", "--num-samples": "-n", "--least-tokens": "-l", "--out": "-o"}


def test_shared_options_have_the_same_letters_everywhere():
    seen = set()
    for name, command in _commands():
        for param in command.params:
            for long, short in SHARED.items():
                if long in param.opts:
                    assert short in param.opts, f"{name}: {long} without {short}"
                    seen.add(long)
            for short, long in ((s, name_) for name_, s in SHARED.items()):
                if short in param.opts:
                    assert long in param.opts, f"{name}: {short} means {param.opts} here, not {long}"
            if "--method" in param.opts or "--to" in param.opts or "--cluster" in param.opts:
                pytest.fail(f"{name}: old spelling {param.opts} is visible")
    assert seen == set(SHARED)


def test_device_vocabulary_is_the_engine_and_scales_one():
    from ray_calib.engine.device import DEVICE_CHOICES
    from ray_calib.inc.devices import DEVICE_TYPES

    assert set(options.DEVICE_NAMES) == set(DEVICE_TYPES)
    assert set(options.RUNTIME_DEVICE_NAMES) == set(DEVICE_CHOICES)


def test_rewrite_renamed_spellings():
    renamed = {"--limit": "--num-samples", "-t": "-l"}
    assert options.rewrite_renamed(["--limit", "4", "-t64", "--limit=5", "x"], renamed) == [
        "--num-samples",
        "4",
        "-l64",
        "--num-samples=5",
        "x",
    ]
    assert options.rewrite_renamed(["--", "--limit"], renamed) == ["--", "--limit"]
    with pytest.raises(click.UsageError, match="-t is the old spelling of -l"):
        options.rewrite_renamed(["-t", "4", "-l", "5"], renamed)


@pytest.mark.parametrize(
    "old,value,new,reached",
    [
        ("--limit", "0", "--num-samples", "'-n' / '--num-samples': 0 is not in the range"),
        ("--cluster", "/nonexistent/devices.conf", "--conf", "/nonexistent/devices.conf: no such file"),
    ],
)
def test_old_option_spelling_warns_and_still_works(run_cli, tmp_path, old, value, new, reached):
    result = run_cli("measure", "-m", tmp_path, "-d", tmp_path / "d.jsonl", old, value)
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"warning: {old} is deprecated and will be removed in the next release; use {new}"
    assert reached in result.stderr  # the value reached the new option


def test_old_dataset_info_letters_warn_and_clash_is_refused(run_cli, tmp_path):
    result = run_cli("dataset-info", "-d", tmp_path / "x.jsonl", "-m", tmp_path, "-t", "64", "-l", "128")
    assert result.exit_code == 2 and "warning: -t is deprecated" in result.stderr
    assert "-t is the old spelling of -l" in result.stderr


def test_old_commands_warn_and_work(run_cli, tmp_path):
    conf = tmp_path / "devices.conf"
    conf.write_text("HEAD_NODE_IP=10.0.0.1\nDEVICE_KIND=cpu\n")
    old = run_cli("config", "check", conf)
    new = run_cli("cluster", "check", "--conf", conf)
    assert old.exit_code == new.exit_code == 0 and old.stdout == new.stdout
    assert old.stderr.startswith("warning: `ray-calib config check CONF` is deprecated") and new.stderr == ""
    listed = run_cli("--help").stdout
    assert "quant-config" in listed and "cluster" in listed and " configs " not in listed and " config " not in listed
    quant = tmp_path / "q.json"
    quant.write_text('{"mode": "QUANTIZE", "dump_stats_path": "/x/inc_measure_output"}')
    assert run_cli("configs", "--check", quant).stdout == run_cli("quant-config", "check", quant).stdout


def test_unknown_devices_conf_key_is_refused_with_key_file_and_fix(run_cli, tmp_path):
    conf = tmp_path / "devices.conf"
    conf.write_text("HEAD_NODE_IP=10.0.0.1\nDEVICE_KIND=cpu\nCALIBRATION_BATCH_SIZE=8\n")
    result = run_cli("cluster", "check", "--conf", conf)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert str(conf) in result.stderr and "line 3: unknown key CALIBRATION_BATCH_SIZE" in result.stderr
    assert "did you mean CALIBRATION_MAX_BATCH_SIZE?" in result.stderr


def test_engine_errors_name_the_library_log(run_cli, tmp_path, monkeypatch):
    @click.command()
    def failing() -> None:
        ui.library_logs(tmp_path / "run", "failing")
        import logging

        logging.getLogger("vllm").error("the real reason, in the log")
        raise EngineError("vLLM could not start", fix="see its log")

    module = types.ModuleType("fake_commands")
    module.failing = failing
    monkeypatch.setitem(sys.modules, "fake_commands", module)
    monkeypatch.setitem(cli.COMMANDS, "failing", "fake_commands:failing")
    result = run_cli("failing")
    log = tmp_path / "run" / "logs" / "failing.log"
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip() == f"error: vLLM could not start; see its log (vLLM/Ray log: {log})"
    assert "the real reason, in the log" in log.read_text()


def test_verbose_and_quiet_exclude_each_other(run_cli):
    result = run_cli("-v", "-q", "inspect", ".")
    assert result.exit_code == 2 and "-v and -q" in result.stderr
