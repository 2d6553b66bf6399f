"""The main job on this machine (`make demo`): every stage of the pipeline, shown as it runs."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ray_calib.cli import main as ray_calib

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "inc-ds-r1-0528-g2-tp16"


def stage(number: int, total: int, title: str, *args: object) -> None:
    print(f"\n({number}/{total}) {title}\n    $ ray-calib {' '.join(map(str, args))}", flush=True)
    start = time.perf_counter()
    try:
        ray_calib([str(a) for a in args])
    except SystemExit as exit_:
        if exit_.code:
            sys.exit(f"stage {number} ({title}) failed with exit code {exit_.code}")
    print(f"    done in {time.perf_counter() - start:.1f} s", flush=True)


def main() -> None:
    run = Path("calib-run/demo").absolute()
    if not FIXTURE.is_dir():
        sys.exit(f"the demo reads the DeepSeek-R1 TP16 measurements at {FIXTURE}; put ../shared beside the repo")
    stage(1, 2, "unify DeepSeek-R1 TP16 -> TP8", "unify", "--to-tp", 8, "--in", FIXTURE, "--out",
          run / "unified-tp8", "--force")
    stage(2, 2, "inspect the result", "inspect", run / "unified-tp8")
    print(f"\nartefacts: {run / 'unified-tp8'}")


if __name__ == "__main__":
    main()
