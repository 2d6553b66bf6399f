"""Side effects of node env files that ray-calib sources before every command on a node.

Env files of the hand-run Gaudi flow are accepted as they are, but some lines do more than set
variables. They are reported (by `config check`, `up` and `--dry-run`), not rewritten:

    ray stop [--force]          ends every Ray process on the host, other clusters included, each time
                                the file is sourced (preflight, `ray start`)
    VLLM_TRACE_FUNCTION=1       traces every Python call in every rank: calibration slows down many times
    VLLM_LOGGING_LEVEL=DEBUG    very large logs from every rank
    source utils.sh / set_bucketing   needs that helper file beside the env file on every node
"""

from __future__ import annotations

import re
from pathlib import Path

_CHECKS = (
    (
        re.compile(r"^\s*ray\s+stop\b"),
        "runs `ray stop`, which ends every Ray process on the host (other clusters "
        "too) whenever the file is sourced; remove it, `ray-calib down` stops only ours",
    ),
    (
        re.compile(r"^\s*(export\s+)?VLLM_TRACE_FUNCTION=[\"']?1"),
        "sets VLLM_TRACE_FUNCTION=1: every rank traces "
        "each Python call, calibration becomes many times "
        "slower; remove it",
    ),
    (
        re.compile(r"^\s*(export\s+)?VLLM_LOGGING_LEVEL=[\"']?DEBUG", re.IGNORECASE),
        "sets VLLM_LOGGING_LEVEL=DEBUG: very large logs from every rank",
    ),
    (re.compile(r"^\s*(source|\.)\s+\S*utils\.sh\b"), "sources utils.sh: that file must exist beside it on every node"),
)


def lint(path: str | Path) -> list[str]:
    """One warning per problematic line: '<file>:<line>: <what it does>'."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    warnings = []
    for number, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]
        for pattern, message in _CHECKS:
            if pattern.search(code):
                warnings.append(f"{path}:{number}: {message}")
    return warnings


def lint_conf(conf) -> list[str]:
    """Warnings for every distinct env file of a devices.conf."""
    files = dict.fromkeys(n.source_file for n in conf.nodes if n.source_file)
    return [w for f in files for w in lint(f)]
