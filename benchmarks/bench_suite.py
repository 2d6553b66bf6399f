"""What the README's two commands and CI cost on this machine, from a clean clone.

    python benchmarks/bench_suite.py                      # every tier, then the demo
    python benchmarks/bench_suite.py --tiers test         # only `make test` (set-up from nothing included)
    python benchmarks/bench_suite.py --busy 2             # emulate a slower machine: 2 busy loops beside it

A fresh clone of this checkout's HEAD goes into a temporary directory with the `shared` directory beside it
(as CI has it), and each tier runs there in order: `make test` (which pays for the virtual environment, as a new
user does), `make test-quick`, `make test-extended` and `make demo`. CI (`.ci/run`) is `make test` then
`make test-extended`, so its time is their sum. The clone starts with empty ray-calib and vLLM caches, as on a
new machine (only uv's package cache is shared; `--warm-caches` keeps the machine's).

Printed: the CPU (lscpu), the load average, each tier's wall time against its limit (CI 45 min, `make test` and
`make demo` 10 min, `make test-quick` 3 min) and the ten slowest tests of each pytest tier. `--busy N` runs N
`yes > /dev/null` processes meanwhile: one per core of a 2-core box halves the CPU left to the suite, i.e. a
machine about 2x slower.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# tier -> (make target, limit in seconds)
TIERS = {
    "test": ("test", 600),
    "quick": ("test-quick", 180),
    "extended": ("test-extended", None),
    "demo": ("demo", 600),
}
CI_LIMIT_S = 45 * 60
_DURATION = re.compile(r"^\s*([\d.]+)s (call|setup|teardown)\s+(\S+)")


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    amx = "amx_tile" in fields.get("Flags", "")
    return f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} cores, {'with' if amx else 'no'} AMX"


def clone(workdir: Path) -> Path:
    """HEAD of this checkout, cloned beside a link to `shared` (the layout CI runs in)."""
    checkout = workdir / "ray-calib"
    subprocess.run(["git", "clone", "-q", str(REPO), str(checkout)], check=True)
    if SHARED.is_dir():
        (workdir / "shared").symlink_to(SHARED)
    return checkout


def run_tier(checkout: Path, target: str, log: Path, caches: Path | None) -> tuple[float, int]:
    env = {**os.environ, "CI": "true", "PYTEST_ADDOPTS": "--durations=10"}
    if caches is not None:  # what a new machine starts with: no built models, no compiled kernels
        env.update(
            RAY_CALIB_CACHE=str(caches / "ray-calib"),
            RAY_CALIB_TEST_CACHE=str(caches / "test-tiny-models"),
            VLLM_CACHE_ROOT=str(caches / "vllm"),
        )
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(
            ["make", target], cwd=checkout, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        ).returncode
    return time.perf_counter() - start, code


def slowest(log: Path, count: int = 10) -> list[str]:
    rows = [m for line in log.read_text(errors="replace").splitlines() if (m := _DURATION.match(line))]
    rows.sort(key=lambda m: -float(m[1]))
    return [f"{float(m[1]):7.1f} s  {m[2]:<8} {m[3]}" for m in rows[:count]]


def verdict(seconds: float, limit: float | None) -> str:
    if limit is None:
        return ""
    return f"  (limit {limit / 60:.0f} min: {'met' if seconds <= limit else 'MISSED'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiers", nargs="+", choices=list(TIERS), default=list(TIERS))
    parser.add_argument("--busy", type=int, default=0, help="busy loops beside the suite (emulates a slower CPU)")
    parser.add_argument("--keep", action="store_true", help="keep the clone and the logs")
    parser.add_argument(
        "--warm-caches",
        action="store_true",
        help="reuse this machine's built models and vLLM caches (not a new machine)",
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-suite-"))
    hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(args.busy)]
    times: dict[str, float] = {}
    try:
        checkout = clone(workdir)
        print(f"CPU: {cpu_model()}; load average {os.getloadavg()[0]:.2f}; {args.busy} busy loop(s) beside")
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        print(f"clone of {head.stdout.strip()} in {checkout}", flush=True)
        for tier in args.tiers:
            target, limit = TIERS[tier]
            log = workdir / f"{tier}.log"
            seconds, code = run_tier(checkout, target, log, None if args.warm_caches else workdir / "caches")
            times[tier] = seconds
            status = "ok" if code == 0 else f"FAILED (exit {code}, log {log})"
            print(f"\nmake {target}: {seconds:7.0f} s = {seconds / 60:5.1f} min, {status}{verdict(seconds, limit)}")
            for row in slowest(log):
                print(f"    {row}")
            sys.stdout.flush()
        if {"test", "extended"} <= times.keys():
            ci = times["test"] + times["extended"]
            print(f"\nCI (.ci/run = make test + make test-extended): {ci:.0f} s = {ci / 60:.1f} min", end="")
            print(verdict(ci, CI_LIMIT_S))
    finally:
        for hog in hogs:
            hog.kill()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")


if __name__ == "__main__":
    main()
