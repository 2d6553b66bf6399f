"""Fast JSON for stats files (tens of MB per run): orjson, with INC's 4-space indentation on output."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import orjson

from ray_calib.errors import MeasurementError

_INDENT_RE = re.compile(rb"(?m)^( +)")


def load(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MeasurementError(path, "is missing", fix="re-copy it from the node that wrote it.") from None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as err:
        if b"NaN" in data or b"Infinity" in data:  # Python's json writes these; validation reports them
            with contextlib.suppress(ValueError):
                return json.loads(data)
        what = "is truncated" if err.pos >= len(data.rstrip()) else "is not valid JSON"
        raise MeasurementError(path, f"{what} ({err.msg} at line {err.lineno} column {err.colno})",
                               fix="re-copy it from the node that wrote it or re-run the measurement.") from None


def dumps(obj: Any, *, indent: int = 4) -> bytes:
    """JSON bytes; orjson indents by 2, so leading runs of spaces are scaled to `indent`."""
    text = orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
    if indent == 2:
        return text
    return _INDENT_RE.sub(lambda m: m.group(1) * (indent // 2), text)
