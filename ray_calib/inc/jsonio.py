"""Fast JSON for stats files (tens of MB per run): orjson, falling back to json for NaN/Infinity."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import orjson

from ray_calib.errors import MeasurementError


def load(path: Path) -> tuple[Any, bool]:
    """Parse a JSON file; the flag says whether it held NaN/Infinity (Python's json writes those)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MeasurementError(path, "is missing", fix="re-copy it from the node that wrote it.") from None
    try:
        return orjson.loads(data), False
    except orjson.JSONDecodeError as err:
        if b"NaN" in data or b"Infinity" in data:
            with contextlib.suppress(ValueError):
                return json.loads(data), True
        what = "is truncated" if err.pos >= len(data.rstrip()) else "is not valid JSON"
        raise MeasurementError(
            path,
            f"{what} ({err.msg} at line {err.lineno} column {err.colno})",
            fix="re-copy it from the node that wrote it or re-run the measurement.",
        ) from None


def dumps(obj: Any) -> bytes:
    """Indented JSON; int keys (per-channel weight scales `{0: ..., 1: ...}`) become "0", "1" as in json.dump."""
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS)
