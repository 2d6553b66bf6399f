"""The output layer: progress falls back to plain lines off a terminal; results on stdout, stages on stderr."""

from __future__ import annotations

import logging
import os

import pytest

from ray_calib import ui


@pytest.fixture(autouse=True)
def _reset():
    ui.set_verbosity(0)
    yield
    ui.set_verbosity(0)


def test_progress_prints_plain_lines_when_stderr_is_not_a_terminal(capsys):
    with ui.progress("measure", 6, completed=2, unit="prompts", interval=0.0) as bar:
        bar.advance(2, tok=100)
        bar.advance(2, tok=100)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and len(lines) == 3  # one per advance (interval 0) and the closing line
    assert lines[0].startswith("measure: 4/6 prompts (67%) ") and " tok/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("measure: 6/6 prompts (100%) ") and lines[-1].endswith("ETA 0:00")


def test_progress_interval_holds_back_lines(capsys):
    with ui.progress("write", 100, interval=3600, unit="tensors") as bar:
        for _ in range(100):
            bar.advance()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("write: 100/100 tensors (100%)")


def test_quiet_shows_results_and_warnings_only(capsys):
    ui.set_verbosity(-1)
    ui.stage(1, 2, "check", "x")
    ui.note("a note")
    with ui.progress("p", 2, interval=0) as bar:
        bar.advance(2)
    ui.warn("careful")
    ui.result("the result")
    out, err = capsys.readouterr()
    assert out == "the result\n" and err == "warning: careful\n"


def test_stage_and_table_streams(capsys):
    ui.stage(2, 5, "preflight", "versions")
    ui.table("t", ("a", "bb"), [(1, "xyz")])
    out, err = capsys.readouterr()
    assert err == "(2/5 preflight) versions\n"
    assert out.splitlines() == ["t", "  a  bb", "  -  ---", "  1  xyz"]


def test_library_logs_go_to_the_run_dir_and_are_undone(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)
    path = ui.library_logs(tmp_path / "run", "measure")
    assert path == tmp_path / "run" / "logs" / "measure.log" and ui.log_file() == path
    assert os.environ["VLLM_LOGGING_STREAM"] == "ext://sys.__stderr__"  # descriptor 2: the log while engines run
    assert os.path.isfile(os.environ["VLLM_LOGGING_CONFIG_PATH"])
    logging.getLogger("vllm.engine").info("engine says hello")
    logging.getLogger("ray").warning("ray says hello")
    out, err = capsys.readouterr()
    assert "hello" not in out + err
    text = path.read_text()
    assert "INFO vllm.engine: engine says hello" in text and "WARNING ray: ray says hello" in text
    ui.end_library_logs()
    assert "VLLM_LOGGING_CONFIG_PATH" not in os.environ and ui.log_file() is None


def test_verbose_also_shows_library_logs_on_stderr(tmp_path, capsys):
    ui.set_verbosity(1)
    path = ui.library_logs(tmp_path, "infer")
    logging.getLogger("transformers.x").info("tokenizer loaded")
    assert "tokenizer loaded" in capsys.readouterr().err and "tokenizer loaded" in path.read_text()
    ui.end_library_logs()


def test_while_an_engine_runs_logging_handlers_write_to_the_log_and_we_to_the_user():
    """A library's StreamHandler made on sys.stderr after the switch still lands in the log."""
    import io

    import click

    ours, log = io.StringIO(), io.StringIO()
    routed = ui._Routed(ours, log)  # type: ignore[arg-type]
    handler = logging.StreamHandler(routed)
    record = logging.LogRecord("torch", logging.WARNING, __file__, 1, "W1207 torch noise", None, None)
    handler.emit(record)
    click.echo("(3/4 measure) prompts", file=routed)
    assert log.getvalue() == "W1207 torch noise\n" and ours.getvalue() == "(3/4 measure) prompts\n"
