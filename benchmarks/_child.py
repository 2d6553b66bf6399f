"""What every benchmark here measures: one command as a child process, its wall time and peak RSS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# A small fresh interpreter runs the command and reports its wall time and its children's peak RSS:
# measured from the benchmark process itself, a forked child would inherit the benchmark's own
# (torch-sized) RSS high-water mark. Timing inside the wrapper keeps its own start-up out of the figure.
_WRAPPER = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); p = subprocess.run(sys.argv[1:]); "
    "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
    "print('MEASURED', time.perf_counter() - t, u.ru_maxrss, u.ru_utime + u.ru_stime); "
    "sys.exit(p.returncode)"
)


def run_child(command: list[str], *, env: dict[str, str] | None = None, cpu: bool = False):
    """(wall seconds, peak RSS MiB of the command or any process it waited for, its output), plus with
    `cpu` the CPU seconds (user + system) it and its children used.

    Exits with the output's tail when the command fails, so a broken run never yields a figure.
    """
    process = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output, _, measured = process.stdout.rpartition("MEASURED")
    if process.returncode != 0 or not measured:
        sys.exit(f"benchmark command failed: {' '.join(command)}\n{process.stdout[-3000:]}")
    wall, peak_kb, cpu_seconds = measured.split()[:3]
    if cpu:
        return float(wall), int(peak_kb) / 1024, output, float(cpu_seconds)
    return float(wall), int(peak_kb) / 1024, output


def load_average() -> float:
    """The 1-minute load: the box is shared, so every figure is printed with it."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def children_by_parent() -> dict[int, list[int]]:
    """Every live process's children, from the parent pid in /proc/*/stat."""
    found: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            found.setdefault(parent, []).append(int(entry))
    return found
