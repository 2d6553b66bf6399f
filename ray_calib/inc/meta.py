"""The metadata sidecar `ray_calib_meta.json` that travels with a measurement set (INC ignores it).

It answers the questions a stats file cannot: which model, device and dataset produced these ranges,
at what TP/EP, with which tool versions, and how far a chunked measurement got (for --resume).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_calib import atomic
from ray_calib.errors import MeasurementError

META_FILE = "ray_calib_meta.json"


@dataclass
class RunMeta:
    device_type: str | None = None  # one of inc.devices.DEVICE_TYPES; infer refuses scales made on another type
    model: str | None = None  # hub id or path
    revision: str | None = None
    dataset: str | None = None
    dataset_hash: str | None = None  # sha256 of the prompts actually used
    num_samples: int | None = None
    num_tokens: int | None = None
    tp_size: int | None = None
    ep_size: int | None = None  # 1 = experts sharded by TP, not partitioned
    observer: str | None = None  # e.g. "maxabs"
    fp8_kv: bool | None = None
    versions: dict[str, str] = field(default_factory=dict)
    chunks_done: list[int] = field(default_factory=list)
    chunks_total: int | None = None
    unified_from: int | None = None  # source world size when written by unify
    run_id: str | None = None  # the run (<run dir>/run.json) these rank files belong to; None: made elsewhere
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as-is

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        return {**self.extra, **data}


_FIELDS = {f.name for f in dataclasses.fields(RunMeta)} - {"extra"}
# field -> the JSON type it must have (from the annotations: "int | None" -> int, "dict[str, str]" -> dict)
_TYPES = {
    f.name: {"str": str, "int": int, "bool": bool}.get(f.type.split(" |")[0], dict if "dict" in f.type else list)
    for f in dataclasses.fields(RunMeta)
    if f.name in _FIELDS
}


def read_meta(directory: str | Path) -> RunMeta | None:
    """Return the sidecar of `directory`, or None when there is none (e.g. plain INC output)."""
    path = Path(directory) / META_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise MeasurementError(path, f"is not valid JSON ({err})", fix="delete it or restore it.") from None
    if not isinstance(data, dict):
        raise MeasurementError(path, "must hold a JSON object", fix="delete it or restore it.")
    known = {k: v for k, v in data.items() if k in _FIELDS}
    for key, value in known.items():
        expected = _TYPES[key]
        if value is not None and (not isinstance(value, expected) or (type(value) is bool and expected is not bool)):
            raise MeasurementError(
                path,
                f"field '{key}' is {value!r}, expected {expected.__name__}",
                fix="delete the field (or the file) or restore it.",
            )
    return RunMeta(**known, extra={k: v for k, v in data.items() if k not in _FIELDS})


def write_meta(directory: str | Path, meta: RunMeta) -> Path:
    return atomic.write_json(Path(directory) / META_FILE, meta.to_json())
