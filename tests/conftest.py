"""Shared test helpers: the real fixtures beside the repo, and running the CLI like a user does."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

# A suite started in the background (`make test &`, nohup) inherits SIGINT ignored, and so would every process
# it starts: the interrupt tests, which send SIGINT on purpose, would wait for an exit that never comes.
signal.signal(signal.SIGINT, signal.default_int_handler)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"
DS_R1_TP16 = FIXTURES / "inc-ds-r1-0528-g2-tp16"
LLAMA70B_TP4 = FIXTURES / "inc-distill-llama-70b-g2-tp4"
LLAMA31_G3_TP2 = FIXTURES / "inc-llama31-70b-g3-tp2"  # range files and INC's own MAXABS_HW scale files


SLOW_TIMEOUT_S = 1200  # a slow test may start several vLLM engines (session fixtures run inside the first user)
# Session fixtures that run real `ray-calib measure` engines: a test using one is slow whatever its own marks say.
ENGINE_FIXTURES = {"measured"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    """Tests of real engines are `slow`; `slow`/`cluster` tests without their own `timeout` mark get SLOW_TIMEOUT_S
    instead of the unit default."""
    for item in items:
        uses_engine_fixture = bool(ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())))
        if uses_engine_fixture:
            item.add_marker(pytest.mark.slow)
        if uses_engine_fixture:  # `pytest -n 2 --dist loadgroup` (make test): one worker makes each run once
            item.add_marker(pytest.mark.xdist_group("measure-runs"))
        if item.get_closest_marker("timeout") is None and (
            item.get_closest_marker("slow") or item.get_closest_marker("cluster")
        ):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


def fixture_dir(path: Path) -> Path:
    """The fixture directory, or a clean skip when the real INC files (docs/design.md §10) are absent."""
    if not path.is_dir():
        pytest.skip(f"real INC fixtures not found at {path} (the shared directory beside the checkout is absent)")
    return path


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys):
    """Call `ray-calib ARGS...` in-process through the real entry point (error table included)."""
    from ray_calib.cli import main

    def run(*args: object) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run


def tiny_model_cache_key(arch: str, seed: int) -> str:
    """What a tiny model's bytes depend on: its config, seed, the builder's source and the library versions."""
    import tokenizers
    import torch
    import transformers

    from ray_calib.testing.tiny import model as builder

    digest = hashlib.sha256(
        json.dumps(
            [
                arch,
                seed,
                builder.CONFIGS[arch],
                builder.VOCAB_SIZE,
                torch.__version__,
                transformers.__version__,
                tokenizers.__version__,
            ]
        ).encode()
    )
    for source in sorted(Path(builder.__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def tiny_model_cache() -> Path:
    """On-disk cache of built tiny models, shared by test sessions (RAY_CALIB_TEST_CACHE overrides it)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ray-calib" / "test-tiny-models"
    return Path(os.environ.get("RAY_CALIB_TEST_CACHE", default))


def cached_tiny_model(arch: str, seed: int = 0) -> Path:
    """The built model in the cache, building it once (a rename publishes it whole; a concurrent builder's copy
    that lands first wins)."""
    from ray_calib.testing.tiny.model import make_tiny_model

    final = tiny_model_cache() / f"{arch}-{seed}-{tiny_model_cache_key(arch, seed)}"
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        make_tiny_model(arch, build / arch, seed=seed)
        try:
            os.rename(build / arch, final)
        except OSError:  # another session published it meanwhile
            if not (final / "config.json").exists():
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return final


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """`tiny_model(arch, seed=0)` -> a private copy (named `arch`) of the cached tiny model, one per session.

    Built at most once per machine and library versions; each session copies it (6 MB) so no test can change
    the cache.
    """
    copies: dict[tuple[str, int], Path] = {}
    root = tmp_path_factory.mktemp("tiny-models")

    def get(arch: str, seed: int = 0) -> Path:
        if (arch, seed) not in copies:
            copy = root / f"seed{seed}" / arch
            shutil.copytree(cached_tiny_model(arch, seed), copy)
            copies[arch, seed] = copy
        return copies[arch, seed]

    return get
