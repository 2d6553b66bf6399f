"""BF16 and FP8 answers to the same prompts, side by side (`ray-calib infer --baseline`).

Each model generates greedily in its own process (`infer.isolated`); the baseline always runs on a
BF16 KV cache, the FP8 model on the cache its config asks for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from ray_calib.infer.isolated import run_isolated
from ray_calib.infer.runner import Completion, InferConfig


@dataclass
class SideBySide:
    prompt: str
    baseline: str
    candidate: str

    @property
    def same(self) -> bool:
        return self.baseline == self.candidate


def side_by_side(config: InferConfig, baseline: Path, prompts: list[str], *, max_new_tokens: int) -> list[SideBySide]:
    base = run_isolated(
        _generate,
        replace(config, model=Path(baseline), fp8_kv=False),
        prompts,
        max_new_tokens,
        what=f"generating with {baseline}",
    )
    cand = run_isolated(_generate, config, prompts, max_new_tokens, what=f"generating with {config.model}")
    return [SideBySide(p, b["text"], c["text"]) for p, b, c in zip(prompts, base, cand)]


def format_side_by_side(rows: list[SideBySide], width: int = 44) -> str:
    lines = [f"{'prompt':<{width}} | {'BF16':<{width}} | FP8"]
    for row in rows:
        marks = "" if row.same else "  (differs)"
        lines.append(
            f"{_cell(row.prompt, width)} | {_cell(row.baseline, width)} | {_cell(row.candidate, width)}{marks}"
        )
    return "\n".join(lines)


def _cell(text: str, width: int) -> str:
    flat = repr(" ".join(text.split()))[1:-1]
    return (flat[: width - 1] + "…") if len(flat) > width else f"{flat:<{width}}"


def _generate(config: InferConfig, prompts: list[str], max_new_tokens: int) -> list[dict]:
    from ray_calib.infer.runner import generate

    if config.tp_size == 1:  # one rank: the engine in this process
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    completions: list[Completion] = generate(config, prompts, max_new_tokens=max_new_tokens)
    return [c.__dict__ for c in completions]
