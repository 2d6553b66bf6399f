"""Calibration rows -> the prompts a measurement runs, and an account of every sample that was left out.

`load_prompts` is the one entry point: read (readers), shuffle with a fixed seed, render (chat template
or the seeds' `"{system_prompt}. {question}"`), tokenize, apply `least_tokens` to raw text, take
`num_samples`. The result carries a hash of the token ids actually used, which goes into the meta
sidecar so two measurements can tell whether they saw the same data.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_calib.data.formats import CONTENT_FIELD, PILE, ROLE_FIELD, check_format, detect_format
from ray_calib.data.readers import read_rows
from ray_calib.errors import DataError

DEFAULT_NUM_SAMPLES = 512  # enough for DeepSeek-R1's 256 experts to all see tokens (seeds)
DEFAULT_SEED = 42
_BATCH = 256  # texts tokenized per call (fast tokenizers batch in Rust)


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]  # what the engine runs (authoritative: text may have been truncated)
    text: str  # the rendered prompt (chat template applied; for truncated text, the decoded ids)


@dataclass
class DataReport:
    path: str
    fmt: str
    read: int  # rows in the dataset
    examined: int  # rows looked at before num_samples were kept
    kept: int
    num_tokens: int  # prompt tokens over the kept samples
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def unused(self) -> int:
        return self.read - self.examined

    def summary(self) -> str:
        parts = [f"{self.read} read", f"{self.kept} kept", f"{self.num_tokens} tokens"]
        parts += [f"{n} dropped ({reason})" for reason, n in self.dropped.items()]
        if self.unused:
            parts.append(f"{self.unused} not needed after reaching the sample count")
        return f"{self.path} [{self.fmt}]: " + ", ".join(parts)


@dataclass
class CalibrationSet:
    prompts: list[Prompt]
    report: DataReport
    dataset_hash: str  # sha256 over the kept token ids, in order

    @property
    def token_ids(self) -> list[list[int]]:
        return [p.token_ids for p in self.prompts]

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]


def load_prompts(
    path: str | os.PathLike,
    tokenizer: Any,
    fmt: str | None = None,
    *,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    least_tokens: int | None = None,
    seed: int = DEFAULT_SEED,
) -> CalibrationSet:
    """Load up to `num_samples` prompts from `path` for `tokenizer` (an HF tokenizer or a model directory).

    `least_tokens` (pile only) drops texts shorter than that many tokens and truncates the others to
    it, so every prompt has the same length as in the seeds' calibration runs.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory", fix="check --dataset.")
    fmt = check_format(fmt) if fmt else detect_format(path)
    if num_samples < 1:
        raise DataError(f"--num-samples must be at least 1, got {num_samples}", fix="pass a positive count.")
    if least_tokens is not None and least_tokens < 1:
        raise DataError(f"--least-tokens must be at least 1, got {least_tokens}", fix="pass a positive count.")
    if least_tokens is not None and fmt != PILE:
        raise DataError(
            f"--least-tokens {least_tokens} applies to pile-style text only",
            fix="drop --least-tokens for chat formats (their prompts are never truncated).",
        )
    tokenizer = _tokenizer(tokenizer)
    rows = read_rows(path, fmt)
    if not rows:
        raise DataError(f"{path}: holds no samples", fix="check the file or choose another --dataset.")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    prompts, dropped, examined = _select(fmt, [rows[i] for i in order], tokenizer, num_samples, least_tokens)
    report = DataReport(
        path=str(path),
        fmt=fmt,
        read=len(rows),
        examined=examined,
        kept=len(prompts),
        num_tokens=sum(len(p.token_ids) for p in prompts),
        dropped=dict(dropped),
    )
    if not prompts:
        raise DataError(
            f"{report.summary()}: no samples left after {_which_filter(dropped, least_tokens)}", fix=_empty_fix(dropped)
        )
    return CalibrationSet(prompts=prompts, report=report, dataset_hash=_hash(prompts))


def validation_prompts(
    path: str | os.PathLike,
    tokenizer: Any,
    fmt: str | None,
    *,
    calibrated: int,
    dataset_hash: str,
    count: int,
    least_tokens: int | None = None,
) -> list[Prompt]:
    """Up to `count` prompts of the same dataset that the measurement never saw: the ones `load_prompts`
    takes right after its first `calibrated`. [] when the dataset has no more, or when its first
    `calibrated` prompts no longer hash to `dataset_hash` (the file changed: no split can be trusted)."""
    try:
        calib = load_prompts(path, tokenizer, fmt, num_samples=calibrated + count, least_tokens=least_tokens)
    except DataError:
        return []
    if _hash(calib.prompts[:calibrated]) != dataset_hash:
        return []
    return calib.prompts[calibrated:]


def _select(
    fmt: str, rows: list[Any], tokenizer: Any, num_samples: int, least_tokens: int | None
) -> tuple[list[Prompt], Counter, int]:
    prompts: list[Prompt] = []
    dropped: Counter = Counter()
    examined = 0
    for start in range(0, len(rows), _BATCH):
        batch = rows[start : start + _BATCH]
        texts, special = [], []
        for row in batch:
            rendered = _render(fmt, row, tokenizer)
            texts.append(rendered[0] if rendered else "")
            special.append(rendered[1] if rendered else True)
        encoded = _encode(tokenizer, texts, special)
        for text, ids in zip(texts, encoded):
            examined += 1
            reason = _drop_reason(text, ids, least_tokens)
            if reason:
                dropped[reason] += 1
                continue
            if least_tokens is not None and len(ids) > least_tokens:
                ids = ids[:least_tokens]
                text = tokenizer.decode(ids)
            prompts.append(Prompt(token_ids=list(ids), text=text))
            if len(prompts) == num_samples:
                return prompts, dropped, examined
    return prompts, dropped, examined


def _render(fmt: str, row: Any, tokenizer: Any) -> tuple[str, bool] | None:
    """(prompt text, whether the tokenizer should add its special tokens), or None for an unusable row."""
    if fmt == PILE:
        return (row, True) if isinstance(row, str) and row.strip() else None
    messages = _messages(fmt, row)
    if messages is None:
        return None
    if getattr(tokenizer, "chat_template", None):
        generation = messages[-1][ROLE_FIELD] != "assistant"
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        return text, False  # the template already holds BOS and the role markers
    return ". ".join(m[CONTENT_FIELD] for m in messages), True


def _messages(fmt: str, row: Any) -> list[dict[str, str]] | None:
    if fmt == "mlcommons":
        system, question = row
        if not isinstance(question, str) or not question.strip():
            return None
        if isinstance(system, str) and system.strip():
            return [{ROLE_FIELD: "system", CONTENT_FIELD: system}, {ROLE_FIELD: "user", CONTENT_FIELD: question}]
        return [{ROLE_FIELD: "user", CONTENT_FIELD: question}]
    if not all(isinstance(m[CONTENT_FIELD], str) and isinstance(m[ROLE_FIELD], str) for m in row):
        return None
    return [{ROLE_FIELD: m[ROLE_FIELD], CONTENT_FIELD: m[CONTENT_FIELD]} for m in row]


def _encode(tokenizer: Any, texts: list[str], special: list[bool]) -> list[list[int]]:
    out: list[list[int] | None] = [None] * len(texts)
    for flag in (True, False):
        index = [i for i, s in enumerate(special) if s is flag and texts[i]]
        if index:
            ids = tokenizer([texts[i] for i in index], add_special_tokens=flag)["input_ids"]
            for i, row_ids in zip(index, ids):
                out[i] = row_ids
    return [ids or [] for ids in out]


def _drop_reason(text: str, ids: list[int], least_tokens: int | None) -> str | None:
    if not text:
        return "empty or not text"
    if least_tokens is not None and len(ids) < least_tokens:
        return f"shorter than {least_tokens} tokens"
    return None


def _which_filter(dropped: Counter, least_tokens: int | None) -> str:
    if least_tokens is not None and any(r.startswith("shorter") for r in dropped):
        return f"the --least-tokens {least_tokens} filter"
    return "dropping empty or non-text samples"


def _empty_fix(dropped: Counter) -> str:
    if any(r.startswith("shorter") for r in dropped):
        return "lower --least-tokens or use a dataset with longer texts."
    return "check that the text fields hold non-empty strings."


def _hash(prompts: list[Prompt]) -> str:
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(",".join(map(str, prompt.token_ids)).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _tokenizer(tokenizer: Any) -> Any:
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    except (OSError, ValueError) as err:
        raise DataError(
            f"{tokenizer}: cannot load a tokenizer ({str(err).splitlines()[0]})",
            fix="pass the model directory (with tokenizer.json / tokenizer_config.json).",
        ) from None
