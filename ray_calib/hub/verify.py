"""What `push` publishes must have been checked: a passed `eval` of the very checkpoint being pushed, with
every calibrated scale in use in the engine (eval's scale audit).

`eval` writes its verdict into eval.json (which checkpoint, by `runrecord.checkpoint_digest`, the
--min-agreement threshold and whether it passed). `--no-verify` skips the check and says so in the card.
"""

from __future__ import annotations

import json

from ray_calib.errors import ConfigError
from ray_calib.rundir import RunDir
from ray_calib.runrecord import checkpoint_digest

_FIX = "run `ray-calib eval --min-agreement 0.9` on the run's checkpoint, or pass --no-verify (written into the card)"


def verification(run: RunDir, *, verify: bool = True) -> str:
    """The card's line on what was checked; a run that was not checked is refused unless `verify` is False."""
    if not verify:
        return "Not verified: pushed with `--no-verify` (no passed eval of this checkpoint was required)."
    verdict = _verdict(run)
    worst, threshold = verdict.get("worst_agreement"), verdict.get("min_agreement")
    if threshold is None:
        raise ConfigError(f"{run.eval_json}: the eval had no --min-agreement, so nothing passed or failed", fix=_FIX)
    if not verdict.get("passed"):
        raise ConfigError(
            f"{run.eval_json}: the eval failed its threshold (top-1 agreement {worst} < {threshold})", fix=_FIX
        )
    if verdict.get("dropped_scales"):
        raise ConfigError(
            f"{run.eval_json}: the engine left {verdict['dropped_scales']} calibrated scale(s) of the checkpoint "
            "unused (eval's scale audit; --allow-scale-loss accepted it for the eval, not for publishing)",
            fix=_FIX,
        )
    current = checkpoint_digest(run.fp8)
    if current is not None and verdict.get("candidate_digest") != current:
        raise ConfigError(
            f"{run.eval_json}: the eval scored {verdict.get('candidate')}, not the checkpoint in {run.fp8} as it is "
            "now (it was written or changed after the eval)",
            fix=_FIX,
        )
    return f"Verified: `ray-calib eval` top-1 agreement {worst:.4g} >= --min-agreement {threshold} on this checkpoint."


def _verdict(run: RunDir) -> dict:
    try:
        data = json.loads(run.eval_json.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{run.root}: no eval.json, so the FP8 model was never checked", fix=_FIX) from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{run.eval_json}: unreadable ({err})", fix=_FIX) from None
    verdict = data.get("verdict") if isinstance(data, dict) else None
    if not isinstance(verdict, dict):
        raise ConfigError(f"{run.eval_json}: holds no verdict (written by an older ray-calib eval)", fix=_FIX)
    return verdict
