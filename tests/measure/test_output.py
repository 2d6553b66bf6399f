"""A real `ray-calib measure` run: results alone on stdout, stages and progress on stderr, vLLM in the log file."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.slow


def test_measure_keeps_vllm_logs_in_the_run_dir(measured):
    run = measured("llama", 2, True)  # the run test_measure_runs.py checks too
    log = run.out.parent / "logs" / "measure.log"
    text = log.read_text()
    assert " vllm." in text and " INFO " in text  # vLLM's own INFO records (engine and workers)
    for stream in (run.stdout, run.stderr):
        assert " vllm." not in stream and "INFO" not in stream
    assert run.stdout.splitlines()[-1].startswith("wrote 2 rank files")
    assert "(1/4 check)" in run.stderr and "(4/4 write)" in run.stderr
    # stderr is a pipe here: progress comes as plain lines, the last one with the totals
    assert any(
        re.match(r"measure: (\d+)/\1 prompts \(100%\) .* prompts/s .* tok/s", line) for line in run.stderr.splitlines()
    )
