"""The calibration-set formats ray-calib reads, and the one place their field names are spelled out.

pile        pile-style raw text, field `text`: JSONL, a JSON array, Parquet, plain text (one sample per
            line) or a `datasets` directory saved with `save_to_disk`
mlcommons   MLCommons-style pandas DataFrame pickle with `system_prompt` and `question`
tc          JSONL, each line a list of chat messages `{"role": ..., "content": ...}`
"""

from __future__ import annotations

from pathlib import Path

from ray_calib.errors import DataError

PILE, MLCOMMONS, TC = "pile", "mlcommons", "tc"
FORMATS = (PILE, MLCOMMONS, TC)
TEXT_FIELD = "text"
SYSTEM_FIELD, QUESTION_FIELD = "system_prompt", "question"
ROLE_FIELD, CONTENT_FIELD = "role", "content"

_PICKLE_SUFFIXES = (".pkl", ".pickle")
_TEXT_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".text")


def detect_format(path: Path) -> str:
    """Guess the format from the path: a pickle is MLCommons, a `datasets` dir or text file is pile.

    `tc` JSONL looks like pile JSONL from the outside; it is recognised from its first line (a list).
    """
    if path.is_dir():
        return PILE
    suffix = path.suffix.lower()
    if suffix in _PICKLE_SUFFIXES:
        return MLCOMMONS
    if suffix == ".jsonl" and _first_line_is_list(path):
        return TC
    if suffix in _TEXT_SUFFIXES:
        return PILE
    raise DataError(
        f"{path}: cannot tell the dataset format from the suffix '{suffix}'",
        fix=f"pass --format with one of {', '.join(FORMATS)}.",
    )


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise DataError(f"unknown dataset format '{fmt}'", fix=f"use one of {', '.join(FORMATS)}.")
    return fmt


def _first_line_is_list(path: Path) -> bool:
    with path.open("rb") as handle:
        for line in handle:
            if line.strip():
                return line.lstrip().startswith(b"[")
    return False
