"""Read a calibration file into raw rows, one reader per format; no tokenizing here.

Rows are what the format holds: a text (pile), a `(system_prompt, question)` pair (mlcommons) or a
list of chat messages (tc). Schema problems are errors that name the file, the missing field and the
fields that were found, because a wrong column name is the usual mistake.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray_calib.data.formats import (
    CONTENT_FIELD,
    MLCOMMONS,
    PILE,
    QUESTION_FIELD,
    ROLE_FIELD,
    SYSTEM_FIELD,
    TC,
    TEXT_FIELD,
)
from ray_calib.data.safe_pickle import load_dataframe
from ray_calib.errors import DataError

Messages = list[dict[str, str]]


def read_rows(path: Path, fmt: str) -> list[Any]:
    if not path.exists():
        raise DataError(f"{path}: no such file or directory", fix="check --dataset.")
    readers: dict[str, Callable[[Path], list[Any]]] = {PILE: _pile, MLCOMMONS: _mlcommons, TC: _tc}
    return readers[fmt](path)


def _missing(path: Path, missing: list[str], found: list[str], where: str = "") -> DataError:
    names = ", ".join(f"'{m}'" for m in missing)
    listed = ", ".join(map(str, found)) or "none"
    return DataError(
        f"{path}{where}: missing field {names} (fields found: {listed})",
        fix="rename the column or choose the matching --format.",
    )


def _pile(path: Path) -> list[str]:
    if path.is_dir():
        return _datasets_dir(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(
                f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})",
                fix="re-export it, or pass JSONL/plain text.",
            ) from None
        if TEXT_FIELD not in frame.columns:
            raise _missing(path, [TEXT_FIELD], list(frame.columns))
        return list(frame[TEXT_FIELD])
    if suffix == ".json":
        return _texts(path, _json_array(path))
    if suffix == ".jsonl":
        return _texts(path, _jsonl(path))
    return [line for line in path.read_text(errors="replace").splitlines() if line.strip()]


def _texts(path: Path, records: list[tuple[int, Any]]) -> list[Any]:
    texts = []
    for line, record in records:
        if not isinstance(record, dict):
            raise DataError(
                f"{path}:{line}: expected a JSON object with '{TEXT_FIELD}', got {type(record).__name__}",
                fix="use --format tc for lists of chat messages.",
            )
        if TEXT_FIELD not in record:
            raise _missing(path, [TEXT_FIELD], list(record), where=f":{line}")
        texts.append(record[TEXT_FIELD])
    return texts


def _datasets_dir(path: Path) -> list[str]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(
            f"{path}: not a `datasets` directory saved with save_to_disk ({err})",
            fix="pass a JSONL/Parquet/text file, or the directory `Dataset.save_to_disk` wrote.",
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded and len(loaded) != 1:
            raise DataError(
                f"{path}: holds splits {sorted(loaded)} and none is 'train'",
                fix="save the split you want on its own with `dataset[split].save_to_disk(...)`.",
            )
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    if TEXT_FIELD not in loaded.column_names:
        raise _missing(path, [TEXT_FIELD], loaded.column_names)
    return list(loaded[TEXT_FIELD])


def _mlcommons(path: Path) -> list[tuple[Any, Any]]:
    frame = load_dataframe(path)
    missing = [f for f in (SYSTEM_FIELD, QUESTION_FIELD) if f not in frame.columns]
    if missing:
        raise _missing(path, missing, list(frame.columns))
    return list(zip(frame[SYSTEM_FIELD], frame[QUESTION_FIELD]))


def _tc(path: Path) -> list[Messages]:
    rows = []
    for line, record in _jsonl(path):
        if not isinstance(record, list) or not record:
            raise DataError(
                f"{path}:{line}: expected a non-empty JSON list of chat messages, got {type(record).__name__}",
                fix='use --format pile for {"text": ...} records.',
            )
        for message in record:
            if not isinstance(message, dict):
                raise DataError(
                    f"{path}:{line}: a message is a {type(message).__name__}, not an object",
                    fix=f'write each message as {{"{ROLE_FIELD}": ..., "{CONTENT_FIELD}": ...}}.',
                )
            missing = [f for f in (ROLE_FIELD, CONTENT_FIELD) if f not in message]
            if missing:
                raise _missing(path, missing, list(message), where=f":{line}")
        rows.append(record)
    return rows


def _jsonl(path: Path) -> list[tuple[int, Any]]:
    records = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{number}: not valid JSON ({err.msg})", fix="each line must be one JSON value (JSON Lines)."
                ) from None
    return records


def _json_array(path: Path) -> list[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno})",
            fix="for one record per line use the .jsonl suffix.",
        ) from None
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON array of records, got {type(data).__name__}",
            fix='write a list of {"text": ...} objects, or use JSON Lines (.jsonl).',
        )
    return [(i + 1, record) for i, record in enumerate(data)]
