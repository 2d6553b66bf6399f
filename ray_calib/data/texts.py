"""Real English text that every machine of this project has: calibration and held-out passages.

    pydoc         CPython's `pydoc_data.topics` (79 topics of technical prose, ~465k characters)
    licenses      Debian's /usr/share/common-licenses (legal prose: GPL, Apache, MPL, ...)
    debian-docs   README and NEWS files of installed Debian packages under /usr/share/doc (plain or .gz)

Each source's documents are sorted, shuffled with a fixed seed and split in two halves by document:
`calibration` and `heldout` never share a document, so held-out figures are on text the scales never
saw. A document is cut into passages at paragraph breaks, `min_chars` to `max_chars` long (about
250 to 600 tokens of English).
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics

from ray_calib import atomic
from ray_calib.errors import DataError

SOURCES = ("pydoc", "licenses", "debian-docs")
SPLITS = ("calibration", "heldout")
LICENSES_DIR = Path("/usr/share/common-licenses")
DOC_DIR = Path("/usr/share/doc")
SEED = 42
# `eval` without --texts: held-out passages of Python's documentation, enough positions (~7k tokens) for
# the agreement and KL figures to mean something.
DEFAULT_HELDOUT = ("pydoc", 16)


def documents(source: str) -> list[tuple[str, str]]:
    """(name, text) of every document of `source`, sorted by name."""
    if source == "pydoc":
        return sorted(topics.items())
    if source == "licenses":
        files = {p.resolve() for p in LICENSES_DIR.glob("*") if p.is_file()}  # GPL -> GPL-3 etc. counted once
        return sorted((p.name, p.read_text(errors="replace")) for p in files)
    if source == "debian-docs":
        docs = sorted(
            p
            for pattern in ("*/README*", "*/NEWS*")
            for p in DOC_DIR.glob(pattern)
            if p.is_file() and p.suffix in ("", ".gz", ".md", ".txt", ".Debian")
        )
        return [(str(p.relative_to(DOC_DIR)), _read(p)) for p in docs]
    raise DataError(f"unknown text source '{source}'", fix=f"use one of {', '.join(SOURCES)}.")


def _read(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def split_documents(source: str, split: str) -> list[tuple[str, str]]:
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'", fix=f"use one of {', '.join(SPLITS)}.")
    docs = documents(source)
    random.Random(SEED).shuffle(docs)
    half = len(docs) // 2
    return docs[:half] if split == "calibration" else docs[half:]


def passages(text: str, *, min_chars: int = 1200, max_chars: int = 2400) -> Iterator[str]:
    """Consecutive paragraphs joined until at least `min_chars`; longer paragraphs are cut at `max_chars`."""
    current: list[str] = []
    size = 0
    for paragraph in (p.strip() for p in text.replace("\r\n", "\n").split("\n\n")):
        if not paragraph:
            continue
        while len(paragraph) > max_chars:
            cut = paragraph.rfind(" ", 0, max_chars)
            cut = cut if cut > min_chars // 2 else max_chars
            yield from _flush(current, paragraph[:cut], min_chars)
            current, size, paragraph = [], 0, paragraph[cut:].strip()
        size += len(paragraph) + (2 if current else 0)  # the "\n\n" that joins it
        current.append(paragraph)
        if size >= min_chars:
            yield "\n\n".join(current)
            current, size = [], 0


def _flush(current: list[str], piece: str, min_chars: int) -> Iterator[str]:
    text = "\n\n".join([*current, piece])
    if len(text) >= min_chars:
        yield text


def sample(source: str, split: str, num: int, *, min_chars: int = 1200, max_chars: int = 2400) -> list[str]:
    """`num` passages of `source`'s `split`, the same ones on every call (fixed seed)."""
    pool = [
        p
        for _, text in split_documents(source, split)
        for p in passages(text, min_chars=min_chars, max_chars=max_chars)
    ]
    if len(pool) < num:
        raise DataError(
            f"text source '{source}' ({split}) has {len(pool)} passages of >= {min_chars} characters, "
            f"fewer than the {num} asked for",
            fix="ask for fewer samples or shorter passages.",
        )
    random.Random(SEED).shuffle(pool)
    return pool[:num]


def default_heldout() -> tuple[list[str], str]:
    """The built-in held-out texts and one line saying what they are."""
    source, num = DEFAULT_HELDOUT
    return sample(source, "heldout", num), (
        f"no --texts: scoring {num} held-out passages of Python's documentation ({source}, split heldout; "
        "`ray-calib make-text-set` writes others)"
    )


def write_jsonl(texts: list[str], out: Path) -> Path:
    """One `{"text": ...}` per line: the `pile` format `measure --dataset` and `eval --texts` read."""
    return atomic.write_text(out, "".join(json.dumps({"text": t}) + "\n" for t in texts))
