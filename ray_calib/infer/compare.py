"""BF16 and FP8 answers to the same prompts, side by side (`ray-calib infer --baseline`).

Each model generates greedily in its own process (`infer.isolated`); the baseline always runs on a
BF16 KV cache, the FP8 model on the cache its config asks for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from ray_calib.infer.isolated import run_isolated
from ray_calib.infer.runner import Completion, InferConfig, generate_audited


@dataclass
class SideBySide:
    prompt: str
    baseline: str
    candidate: str

    @property
    def same(self) -> bool:
        return self.baseline == self.candidate


def side_by_side(
    config: InferConfig, baseline: Path, prompts: list[str], *, max_new_tokens: int
) -> tuple[list[SideBySide], dict | None]:
    """The rows, and the FP8 engine's scale audit (`infer.audit`, JSON form; None for an unquantized model)."""
    base = run_isolated(
        _generate,
        replace(config, model=Path(baseline), fp8_kv=False),
        prompts,
        max_new_tokens,
        what=f"generating with {baseline}",
        device=config.device,
    )
    cand = run_isolated(
        _generate, config, prompts, max_new_tokens, what=f"generating with {config.model}", device=config.device
    )
    rows = [SideBySide(p, b["text"], c["text"]) for p, b, c in zip(prompts, base["completions"], cand["completions"])]
    return rows, cand["audit"]


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


def _generate(config: InferConfig, prompts: list[str], max_new_tokens: int) -> dict:
    if config.tp_size == 1:  # one rank: the engine in this process
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    completions: list[Completion]
    completions, audit = generate_audited(config, prompts, max_new_tokens=max_new_tokens)
    return {"completions": [c.__dict__ for c in completions], "audit": audit.to_json() if audit else None}
