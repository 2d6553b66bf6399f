"""Where one calibration run keeps its artefacts, so that commands chain without path arguments.

<run dir>/                 --run-dir, env RAY_CALIB_RUN_DIR, default ./calib-run
  measure/                 ray-calib measure: INC rank files at TP=N, ray_calib_meta.json, coverage.json
  unified-tp<M>/           ray-calib unify --to-tp M
  expanded-ep<W>/          ray-calib expand --to-ranks W
  configs/                 QUANT_CONFIG files (ray-calib quant-config write)
  scales/                  INC scale files (ray-calib scales)
  fp8/                     the FP8 checkpoint for CPU/CUDA (ray-calib quantize)
  fp8-gaudi2/, fp8-gaudi3/ the FP8 checkpoint for vllm-gaudi (ray-calib quantize --format compressed-tensors)
  eval.json                ray-calib eval
  report/                  ray-calib report: PNG plots and summary
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import click

DEFAULT_RUN_DIR = "calib-run"
_UNIFIED_RE = re.compile(r"^unified-tp(\d+)$")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def resolve(cls, path: str | os.PathLike | None = None) -> RunDir:
        return cls(Path(path or os.environ.get("RAY_CALIB_RUN_DIR") or DEFAULT_RUN_DIR).absolute())

    @property
    def measure(self) -> Path:
        return self.root / "measure"

    def unified(self, tp: int) -> Path:
        return self.root / f"unified-tp{tp}"

    def expanded(self, ranks: int) -> Path:
        return self.root / f"expanded-ep{ranks}"

    def _unified(self) -> list[tuple[int, Path]]:
        return sorted((int(m[1]), p) for p in self.root.glob("unified-tp*") if (m := _UNIFIED_RE.match(p.name)))

    def latest_unified(self) -> Path | None:
        """The unified directory with the smallest TP (the one a one-node server uses), if any."""
        found = self._unified()
        return found[0][1] if found else None

    def unified_for_node(self, cards: int) -> Path | None:
        """Gaudi serving: the unified directory with the largest TP one node of `cards` runs (a `unify --to-tp 1`
        made for `expand` beside a `unify --to-tp 8` must not win); the smallest when none fits."""
        found = self._unified()
        fitting = [path for tp, path in found if tp <= cards]
        return fitting[-1] if fitting else (found[0][1] if found else None)

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    @property
    def scales(self) -> Path:
        return self.root / "scales"

    @property
    def fp8(self) -> Path:
        return self.root / "fp8"

    def fp8_for(self, device: str) -> Path:
        """The Gaudi compressed-tensors checkpoint for `device` (gaudi2 | gaudi3)."""
        return self.root / f"fp8-{device}"

    @property
    def eval_json(self) -> Path:
        return self.root / "eval.json"

    @property
    def report(self) -> Path:
        return self.root / "report"


run_dir_option = click.option(
    "--run-dir",
    type=click.Path(file_okay=False),
    default=None,
    envvar="RAY_CALIB_RUN_DIR",
    help=f"Directory of this calibration run [env RAY_CALIB_RUN_DIR; default ./{DEFAULT_RUN_DIR}].",
)
