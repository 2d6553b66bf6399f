"""What `infer` and `eval` are asked to do: typed requests the CLI builds and `infer.stage` runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ray_calib.engine.device import Target
from ray_calib.rundir import RunDir


@dataclass
class InferRequest:
    run: RunDir
    target: Target
    model: Path | None = None  # None: <run-dir>/fp8 (Gaudi: the measured model)
    tp: int | None = None
    conf: Path | None = None  # spread the ranks over the cluster `up` started from this devices.conf
    fp8_kv: bool | None = None  # None: as the checkpoint (Gaudi: the measurement) says
    quant_config: Path | None = None  # Gaudi: the QUANTIZE QUANT_CONFIG
    timeout_s: int = 1800
    startup_timeout_s: int | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    kv_cache_gib: float = 1.0
    skip_warmup: bool = False
    enforce_eager: bool = False
    allow_device_mismatch: bool = False
    dry_run: bool = False  # resolve only: write nothing, join no cluster, refuse no fit


@dataclass
class EvalRequest:
    run: RunDir
    texts: list[str]
    baseline: Path | None = None  # None: the model in the run's meta
    candidate: Path | None = None  # None: <run-dir>/fp8
    tp: int | None = None
    with_fp8_kv: bool | None = None  # None: when the candidate carries k/v scales
    max_model_len: int = 1024
    min_agreement: float | None = None
    out: Path | None = None  # None: <run-dir>/eval.json, and the verdict recorded in run.json
    allow_scale_loss: bool = False
    kv_cache_gib: float = 1.0
    enforce_eager: bool = False
    target: Target | None = None  # None: this machine's device
    quant_config: Path | None = None  # Gaudi: the QUANTIZE QUANT_CONFIG of the candidate [default: the run's]
    dry_run: bool = False  # show each engine's settings; score nothing, write nothing
