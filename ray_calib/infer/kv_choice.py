"""Calibrated k/v scales or vLLM's scale 1.0 for the FP8 KV cache: chosen by measurement, not by habit.

An FP8 cache with no calibrated scale runs at k_scale = v_scale = 1.0, and for many models that is as good
or better (the values sit well inside FP8's range). So `quantize --fp8-kv` scores both on a validation split
(passages of the calibration dataset the measurement never saw, `data.validation_prompts`): BF16 with a
BF16 cache as the reference, the checkpoint with its calibrated k/v scales, and the same checkpoint without
them (`unit_kv`, vLLM's 1.0), each on an FP8 cache. The lower mean KL against the reference wins; a tie
keeps the calibrated scales. Held-out text is never used here: `eval` scores the result on it afterwards.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ray_calib.infer.fidelity import Variant, mean_kl, score, token_windows, tokenize
from ray_calib.infer.unit_kv import without_kv_scales

CALIBRATED, UNIT = "calibrated", "unit"


@dataclass
class KvScaleChoice:
    chosen: str  # CALIBRATED | UNIT
    mean_kl: dict[str, float]  # CALIBRATED / UNIT -> mean KL against BF16 on the validation split
    texts: int
    positions: int

    def reason(self) -> str:
        kl = self.mean_kl
        verdict = "beat" if self.chosen == CALIBRATED else "did not beat"
        return (
            f"the calibrated k/v scales {verdict} scale 1.0 on {self.texts} validation passages "
            f"({self.positions} positions): mean KL {kl[CALIBRATED]:.4g} vs {kl[UNIT]:.4g}"
        )

    def to_json(self) -> dict:
        return asdict(self)


def choose_kv_scales(
    baseline: Path,
    candidate: Path,
    texts: list[str],
    *,
    tp_size: int,
    device: str,
    max_model_len: int,
    engine_options: dict,
) -> KvScaleChoice | None:
    """Score `candidate`'s FP8 cache with and without its k/v scales; None when it carries none."""
    windows, _ = token_windows(tokenize(baseline, texts), max_model_len)
    options = {**engine_options, "max_model_len": max_model_len}
    with tempfile.TemporaryDirectory(prefix="ray-calib-kv-choice-") as scratch:
        unit = without_kv_scales(candidate, Path(scratch) / "model")
        if unit is None:
            return None
        variants = [Variant("baseline", baseline), Variant(CALIBRATED, candidate, True), Variant(UNIT, unit, True)]
        scores = {
            v.name: score(v, windows, tp_size=tp_size, device=device, engine_options=options)["positions"]
            for v in variants
        }
    reference = scores["baseline"]
    kl = {name: mean_kl(reference, scores[name]) for name in (CALIBRATED, UNIT)}
    return KvScaleChoice(
        chosen=UNIT if kl[UNIT] < kl[CALIBRATED] else CALIBRATED,
        mean_kl=kl,
        texts=len(texts),
        positions=sum(len(p) for p in reference),
    )
