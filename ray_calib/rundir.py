"""Where one calibration run keeps its artefacts, so that commands chain without path arguments.

<run dir>/                 --run-dir, env RAY_CALIB_RUN_DIR, default ./calib-run
  run.json                 the run's facts, each decided once by one stage (runrecord.py)
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
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RUN_DIR = "calib-run"


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
