"""Shared test helpers: the real fixtures beside the repo, and running the CLI like a user does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"
DS_R1_TP16 = FIXTURES / "inc-ds-r1-0528-g2-tp16"
LLAMA70B_TP4 = FIXTURES / "inc-distill-llama-70b-g2-tp4"
LLAMA31_G3_TP2 = FIXTURES / "inc-llama31-70b-g3-tp2"  # range files and INC's own MAXABS_HW scale files


def fixture_dir(path: Path) -> Path:
    """The fixture directory, or a clean skip when ../shared is not beside the repository."""
    if not path.is_dir():
        pytest.skip(f"real INC fixtures not found at {path} (../shared is absent)")
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
