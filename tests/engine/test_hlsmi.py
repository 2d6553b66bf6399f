"""Gaudi device type and HBM from recorded `hl-smi` outputs, and the rule that nothing here opens a card."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_calib.cluster import hlsmi
from ray_calib.engine.device import GiB, detect_target
from ray_calib.errors import EngineError

DATA = Path(__file__).parent / "data"


def fake_hl_smi(directory: Path, recorded: str, code: int = 0) -> Path:
    """An `hl-smi` on PATH that prints a recorded output and logs its arguments."""
    script = directory / "hl-smi"
    script.write_text(f'#!/bin/sh\necho "$@" >> {directory}/hl-smi.args\ncat {DATA / recorded}\nexit {code}\n')
    script.chmod(0o755)
    return script


@pytest.mark.parametrize(
    ("recorded", "kind", "mib", "driver"),
    [
        ("hl-smi-gaudi2.csv", "gaudi2", 98304, "1.21.0-ca59b5a"),
        ("hl-smi-gaudi3.csv", "gaudi3", 131072, "1.21.0-ca59b5a"),
        ("hl-smi-gaudi2-header.csv", "gaudi2", 98304, "1.20.1-366eb9c"),
    ],
)
def test_recorded_outputs(recorded, kind, mib, driver):
    info = hlsmi.summarize(hlsmi.parse_query((DATA / recorded).read_text()), "hl-smi")
    assert (info.device_type, info.cards, info.memory_bytes, info.driver) == (kind, 8, mib << 20, driver)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("HL-225", "gaudi2"),
        ("HL-288", "gaudi2"),
        ("HL-325L", "gaudi3"),
        ("HL-328", "gaudi3"),
        ("GAUDI2", "gaudi2"),
        ("GAUDI3", "gaudi3"),
    ],
)
def test_known_names(name, kind):
    assert hlsmi.device_type_of(name) == kind


@pytest.mark.parametrize("name", ["HL-205", "GAUDI", "HL-2080", "NVIDIA H100"])
def test_unknown_devices_are_refused(name):
    """Gaudi1 or anything else is not mapped to gaudi2: its scales would be wrong."""
    with pytest.raises(EngineError, match=f"unknown Gaudi device '{name}'"):
        hlsmi.device_type_of(name)


def test_mixed_generations_on_one_node_are_refused():
    text = (DATA / "hl-smi-gaudi2.csv").read_text() + (DATA / "hl-smi-gaudi3.csv").read_text()
    with pytest.raises(EngineError, match="both gaudi2 and gaudi3"):
        hlsmi.summarize(hlsmi.parse_query(text), "hl-smi")


def test_query_runs_hl_smi_with_the_csv_query(tmp_path):
    info = hlsmi.query(hl_smi=str(fake_hl_smi(tmp_path, "hl-smi-gaudi3.csv")))
    assert info.device_type == "gaudi3" and info.source == "hl-smi"
    assert (tmp_path / "hl-smi.args").read_text().split() == list(hlsmi.QUERY)


def test_failing_hl_smi_is_one_error(tmp_path):
    with pytest.raises(EngineError, match="failed with code 3"):
        hlsmi.query(hl_smi=str(fake_hl_smi(tmp_path, "hl-smi-gaudi2.csv", code=3)))


def test_without_hl_smi_a_short_subprocess_asks_habana(monkeypatch):
    """The fallback runs in a child process that exits (releasing the card) before vLLM starts."""
    calls = []

    def run(args):
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, stdout="GAUDI2\n103079215104\n", stderr="")

    monkeypatch.setattr(hlsmi.shutil, "which", lambda name: None)
    info = hlsmi.query(run=run)
    assert calls[0][0] == sys.executable and "get_device_name" in calls[0][-1]
    assert (info.device_type, info.memory_bytes, info.source) == ("gaudi2", 96 * GiB, "habana subprocess")


def test_detect_target_reads_hl_smi_and_never_imports_habana(tmp_path):
    """With habana_frameworks installed, the CLI's device detection must not import its device modules."""
    fake_hl_smi(tmp_path, "hl-smi-gaudi2.csv")
    package = tmp_path / "site" / "habana_frameworks"
    (package / "torch" / "hpu").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "torch" / "__init__.py").write_text(
        "raise RuntimeError('habana_frameworks.torch imported: a card would be held by this process')\n"
    )
    code = (
        "import sys; from ray_calib.engine.device import detect_target; t = detect_target(); "
        "print(t.device, t.device_type, t.memory_bytes, t.source); "
        "print(sorted(m for m in sys.modules if m.startswith('habana')))"
    )
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHONPATH": str(tmp_path / "site")}
    env.pop("RAY_CALIB_DEVICE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    first, second = out.stdout.strip().splitlines()[-2:]
    assert first == f"hpu gaudi2 {98304 << 20} hl-smi"
    assert second == "[]"


def test_forced_gaudi_type_works_without_gaudi(monkeypatch):
    monkeypatch.delenv("RAY_CALIB_DEVICE", raising=False)
    target = detect_target("gaudi3")
    assert (target.device, target.device_type, target.memory_bytes) == ("hpu", "gaudi3", 128 * GiB)
    monkeypatch.setenv("RAY_CALIB_DEVICE", "gaudi2")
    assert detect_target().device_type == "gaudi2"
