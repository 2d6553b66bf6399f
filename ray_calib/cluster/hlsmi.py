"""Which Gaudi this node has and how much HBM one card offers, read without opening a card.

A Gaudi card belongs to one process at a time: a process that calls any habana device API (even
`get_device_name()` or `mem_get_info()`) holds a card until it exits, and the vLLM rank that needs that
card then fails to acquire it. So the CLI never imports the habana device modules. It asks `hl-smi`
(a separate program that reads the driver), the way the upstream scripts check the platform, or, where
`hl-smi` is missing, a short-lived Python subprocess that exits (releasing the card) before vLLM starts.

    hl-smi -Q name,memory.total,driver_version -f csv,noheader
    HL-225, 98304 MiB, 1.21.0-ca59b5a

Module names: HL-225 (Gaudi2 OAM), HL-288 (Gaudi2 PCIe), HL-325/HL-325L (Gaudi3 OAM), HL-328 (Gaudi3
PCIe). Any other name is refused: scales made for the wrong device are wrong (full scale 240 vs 448).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ray_calib.errors import EngineError

GiB = 1 << 30
MiB = 1 << 20
QUERY = ("-Q", "name,memory.total,driver_version", "-f", "csv,noheader")
GAUDI_TYPES = ("gaudi2", "gaudi3")
# Module name prefix -> device type (the table the upstream DeepSeek scripts use).
MODULES = {"HL-225": "gaudi2", "HL-288": "gaudi2", "HL-325": "gaudi3", "HL-328": "gaudi3"}
# HBM of one card when it cannot be read (a forced --device on a machine without Gaudi): the data sheets.
NOMINAL_HBM = {"gaudi2": 96 * GiB, "gaudi3": 128 * GiB}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(MiB|GiB|MB|GB)?\s*$", re.IGNORECASE)
_UNITS = {"mib": MiB, "mb": MiB, "gib": GiB, "gb": GiB}
# Run in a child process that exits before vLLM starts, so the card it opens is free again.
_SUBPROCESS_PROBE = "import habana_frameworks.torch.hpu as h; print(h.get_device_name()); print(h.mem_get_info()[1])"

Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


@dataclass(frozen=True)
class Card:
    name: str  # hl-smi's module name (HL-225) or habana's device name (GAUDI2)
    memory_bytes: int
    driver: str | None = None


@dataclass(frozen=True)
class GaudiInfo:
    device_type: str  # gaudi2 | gaudi3
    cards: int
    memory_bytes: int  # HBM of one card
    driver: str | None
    source: str  # how it was found ("hl-smi", "habana subprocess", "forced ...")


def device_type_of(name: str) -> str:
    """gaudi2/gaudi3 from an hl-smi module name (HL-225) or a habana device name (GAUDI2); else refuse."""
    upper = name.strip().upper()
    for prefix, kind in MODULES.items():
        if upper.startswith(prefix):
            return kind
    if upper.startswith("GAUDI") and upper[-1:] in ("2", "3"):
        return f"gaudi{upper[-1]}"
    raise EngineError(
        f"unknown Gaudi device '{name.strip()}' (known: {', '.join(MODULES)}, GAUDI2, GAUDI3)",
        fix="ray-calib supports Gaudi2 and Gaudi3 only; on another device pass --device explicitly.",
    )


def parse_query(text: str) -> list[Card]:
    """The cards in `hl-smi -Q name,memory.total[,driver_version] -f csv,noheader` output."""
    cards = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = [f.strip() for f in line.split(",")]
        if not fields[0] or fields[0].lower() == "name":  # blank line or a header row
            continue
        if len(fields) < 2:
            raise EngineError(
                f"hl-smi output line {number} has no memory.total: {line.strip()!r}",
                fix="check that `hl-smi -Q name,memory.total -f csv,noheader` works on this node.",
            )
        cards.append(
            Card(
                name=fields[0],
                memory_bytes=_memory(fields[1], line),
                driver=fields[2] if len(fields) > 2 and fields[2] else None,
            )
        )
    return cards


def _memory(text: str, line: str) -> int:
    match = _MEMORY.match(text)
    if not match:
        raise EngineError(
            f"hl-smi memory.total {text!r} is not a size (line {line.strip()!r})",
            fix="check the hl-smi version on this node.",
        )
    return int(float(match[1]) * _UNITS[(match[2] or "MiB").lower()])


def summarize(cards: list[Card], source: str) -> GaudiInfo:
    """One device type for the node (a mix is refused) and the smallest card's HBM."""
    if not cards:
        raise EngineError(f"{source} lists no Gaudi card", fix="check the driver (`hl-smi`) on this node.")
    types = {device_type_of(card.name) for card in cards}
    if len(types) > 1:
        raise EngineError(
            f"{source} lists both {' and '.join(sorted(types))} cards on one node",
            fix="run on nodes with one Gaudi generation (scales differ between them).",
        )
    drivers = {card.driver for card in cards if card.driver}
    return GaudiInfo(
        device_type=types.pop(),
        cards=len(cards),
        memory_bytes=min(c.memory_bytes for c in cards),
        driver=drivers.pop() if len(drivers) == 1 else None,
        source=source,
    )


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def query(run: Runner = _run, hl_smi: str | None = None) -> GaudiInfo:
    """Device type and HBM of this node: hl-smi, else a habana subprocess that exits at once."""
    binary = hl_smi or shutil.which("hl-smi")
    if binary:
        result = run([binary, *QUERY])
        if result.returncode == 0 and result.stdout.strip():
            return summarize(parse_query(result.stdout), "hl-smi")
        hint = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise EngineError(
            f"`hl-smi {' '.join(QUERY)}` failed with code {result.returncode}: {hint[0][:200]}",
            fix="check the Habana driver on this node (`hl-smi`).",
        )
    result = run([sys.executable, "-c", _SUBPROCESS_PROBE])
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or len(lines) < 2 or not lines[-1].isdigit():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise EngineError(
            f"no hl-smi on this node, and the habana probe failed: {tail[0][:200]}",
            fix="install the Habana driver tools (hl-smi), or pass --device to say what this node is.",
        )
    return summarize([Card(name=lines[-2], memory_bytes=int(lines[-1]))], "habana subprocess")


def nominal(device_type: str, source: str) -> GaudiInfo:
    """A forced Gaudi type on a machine that has none (dry runs): the data-sheet HBM of one card."""
    return GaudiInfo(
        device_type=device_type, cards=0, memory_bytes=NOMINAL_HBM[device_type], driver=None, source=source
    )
