"""Deterministic pseudo-English text: the tiny tokenizer's training corpus and the synthetic calibration sets.

The sentences are built from a fixed word list by a seeded generator, so a tokenizer trained here and
a calibration set made later share their vocabulary (few unknown pieces) without any download.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

_SUBJECTS = (
    "the model",
    "a cluster",
    "the operator",
    "each rank",
    "the router",
    "an expert",
    "the scale",
    "a worker",
    "the head node",
    "every layer",
    "the cache",
    "this prompt",
    "a token",
    "the team",
)
_VERBS = (
    "measures",
    "reads",
    "writes",
    "routes",
    "computes",
    "stores",
    "sends",
    "checks",
    "splits",
    "merges",
    "quantizes",
    "loads",
    "serves",
    "counts",
    "compares",
    "keeps",
    "finds",
    "shows",
)
_OBJECTS = (
    "the weights",
    "a range",
    "the activations",
    "every expert",
    "the latent cache",
    "a shard",
    "the batch",
    "its tensors",
    "the file",
    "a report",
    "the results",
    "the maximum",
    "all heads",
    "the numbers",
    "a plot",
    "the samples",
    "each chunk",
    "the hidden state",
)
_TAILS = (
    "before the run",
    "after a crash",
    "on every node",
    "at eight ranks",
    "in one pass",
    "for the next step",
    "with a small error",
    "without a copy",
    "across two machines",
    "in the morning",
    "at low precision",
    "by the book",
    "once more",
    "as expected",
)
_TOPICS = (
    "calibration",
    "inference",
    "routing",
    "quantization",
    "attention",
    "memory",
    "networks",
    "experts",
    "tokens",
    "numbers",
    "weather",
    "rivers",
    "music",
    "cooking",
    "history",
    "gardens",
)
_QUESTIONS = (
    "What is {t}?",
    "Why does {t} matter?",
    "How would you explain {t} to a child?",
    "Write a short note about {t}.",
    "List three facts about {t}.",
    "Compare {t} and {u}.",
)
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a careful engineer. Answer briefly.",
    "You answer questions about science and daily life.",
)


def sentence(rng: random.Random) -> str:
    words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
    if rng.random() < 0.6:
        words.append(rng.choice(_TAILS))
    if rng.random() < 0.2:
        words.append(f"{rng.randint(2, 999)} times")
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice((".", ".", ".", "!", "?"))


def paragraph(rng: random.Random, min_sentences: int = 2, max_sentences: int = 12) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(min_sentences, max_sentences)))


def question(rng: random.Random) -> str:
    topic, other = rng.sample(_TOPICS, 2)
    return rng.choice(_QUESTIONS).format(t=topic, u=other)


def paragraphs(count: int, seed: int = 0) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(count):
        yield paragraph(rng)
