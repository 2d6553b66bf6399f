"""Run one engine job in a fresh process and bring back its JSON result.

Two vLLM engines in one process share (and fight over) its distributed state and memory, so every
model that eval scores, or infer compares, runs in its own fresh process (not a daemon: vLLM starts
worker processes of its own). On CPU that process is forked from a server that has imported vLLM once
(multiprocessing's forkserver, no engine in it): a spawned one spends ~7 s importing vLLM again for every
model. Other devices keep spawn: importing vLLM there resolves a platform that may open the accelerator, and
a fork must not inherit that. A user mistake raised in the child comes back as the same one-line error.
"""

from __future__ import annotations

import json
import multiprocessing
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray_calib.errors import EngineError, RayCalibError

# what the forked children need, imported once by the forkserver
PRELOAD = ["vllm.entrypoints.llm", "ray_calib.infer.fidelity", "ray_calib.infer.compare"]


def run_isolated(function: Callable[..., object], *args: object, what: str, device: str) -> Any:
    """`function(*args)` (a module-level function returning JSON-able data) in a fresh process; its JSON."""
    with tempfile.TemporaryDirectory(prefix="ray-calib-isolated-") as tmp:
        out = Path(tmp) / "result.json"
        context = _context(device)
        process = context.Process(target=_child, args=(function, args, str(out)), daemon=False)
        process.start()
        process.join()
        result = json.loads(out.read_text()) if out.exists() else None
    if isinstance(result, dict) and "error" in result and process.exitcode != 0:
        raise EngineError(f"{what}: {result['error']}")
    if process.exitcode != 0 or result is None:
        raise EngineError(
            f"{what} failed with exit code {process.exitcode}",
            fix="run `ray-calib infer --model` on that model to see vLLM's error.",
        )
    return result["value"]


def _context(device: str) -> Any:
    if device != "cpu":
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _child(function: Callable[..., object], args: tuple, out: str) -> None:
    try:
        value = function(*args)
    except RayCalibError as err:
        Path(out).write_text(json.dumps({"error": str(err)}))
        raise SystemExit(1) from None
    Path(out).write_text(json.dumps({"value": value}))
