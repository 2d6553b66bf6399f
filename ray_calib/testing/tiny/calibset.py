"""Small synthetic calibration sets in every format `ray_calib.data` reads, for tests and the demo.

The text comes from `tiny.corpus`, so the tiny tokenizer covers it well; lengths vary on purpose so
that `--least-tokens` has something to drop.
"""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

from ray_calib import atomic
from ray_calib.data.formats import (
    CONTENT_FIELD,
    MLCOMMONS,
    PILE,
    QUESTION_FIELD,
    ROLE_FIELD,
    SYSTEM_FIELD,
    TC,
    TEXT_FIELD,
    check_format,
)
from ray_calib.testing.tiny import corpus


def make_calib_set(fmt: str, out: str | os.PathLike, *, num_samples: int = 64, seed: int = 0) -> Path:
    """Write `num_samples` generated samples in format `fmt` to `out` (atomically); returns the path."""
    out = Path(out)
    rng = random.Random(seed)
    writer = {PILE: _pile, MLCOMMONS: _mlcommons, TC: _tc}[check_format(fmt)]
    writer(out, rng, num_samples)
    return out


def _pile(out: Path, rng: random.Random, count: int) -> None:
    lines = [
        json.dumps({TEXT_FIELD: corpus.paragraph(rng, 1, 16), "meta": {"source": "ray-calib-synthetic"}})
        for _ in range(count)
    ]
    atomic.write_text(out, "\n".join(lines) + "\n")


def _mlcommons(out: Path, rng: random.Random, count: int) -> None:
    import pandas as pd

    rows = [
        {
            "dataset": "synthetic",
            SYSTEM_FIELD: rng.choice(corpus.SYSTEM_PROMPTS),
            QUESTION_FIELD: f"{corpus.question(rng)} {corpus.paragraph(rng, 0, 6)}".strip(),
            "ground_truth": corpus.sentence(rng),
        }
        for _ in range(count)
    ]
    # What `DataFrame.to_pickle` writes, but through ray_calib.atomic (no half-written file).
    atomic.write_bytes(out, pickle.dumps(pd.DataFrame(rows), protocol=pickle.HIGHEST_PROTOCOL))


def _tc(out: Path, rng: random.Random, count: int) -> None:
    lines = []
    for _ in range(count):
        messages = [{ROLE_FIELD: "system", CONTENT_FIELD: rng.choice(corpus.SYSTEM_PROMPTS)}]
        for _turn in range(rng.randint(1, 2)):
            messages.append({ROLE_FIELD: "user", CONTENT_FIELD: corpus.question(rng)})
            messages.append({ROLE_FIELD: "assistant", CONTENT_FIELD: corpus.paragraph(rng, 1, 4)})
        lines.append(json.dumps(messages[:-1]))  # end on a user turn: the model answers it
    atomic.write_text(out, "\n".join(lines) + "\n")
