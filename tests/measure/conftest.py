"""Tiny models, a calibration set, and `ray-calib measure` runs shared by the measure tests.

Each run is a real `ray-calib measure` subprocess (real vLLM on CPU); runs are cached per session so
one vLLM start serves many asserts. Prefill-only runs (max_new_tokens=1) are what the re-shard
invariant compares.

vLLM picks the MLA attention backend by CPU: AMX_MLA where the CPU has AMX tiles, else CPU_MLA; both
can be forced (`--attention-backend`). Tests about MLA run on each backend this CPU can run
(`MLA_BACKENDS`); AMX_MLA is skipped, with the reason, on CPUs without AMX.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def has_amx() -> bool:
    import torch

    return bool(torch.cpu._is_amx_tile_supported())


NO_AMX = "this CPU has no AMX tiles, so vLLM cannot run its AMX_MLA backend here (it would silently use CPU_MLA)"
MLA_BACKENDS = [
    pytest.param("CPU_MLA", id="CPU_MLA"),
    pytest.param("AMX_MLA", id="AMX_MLA", marks=pytest.mark.skipif("not config._amx", reason=NO_AMX)),
]
# (arch, attention backend): one entry per backend the arch's attention can run on
ARCH_BACKENDS = [
    pytest.param("llama", None, id="llama-CPU_ATTN"),
    pytest.param("deepseek_v3", "CPU_MLA", id="deepseek_v3-CPU_MLA"),
    pytest.param(
        "deepseek_v3", "AMX_MLA", id="deepseek_v3-AMX_MLA", marks=pytest.mark.skipif("not config._amx", reason=NO_AMX)
    ),
]


def pytest_configure(config) -> None:
    config._amx = has_amx()


def default_backend(arch: str) -> str | None:
    """The attention backend vLLM picks for `arch` on this CPU when none is forced."""
    if arch != "deepseek_v3":
        return None
    return "AMX_MLA" if has_amx() else "CPU_MLA"


NUM_PROMPTS = 8
CHUNK = 2  # prompts per checkpoint (and per batch): 4 chunks per run, so a run can be killed mid-way


def measure_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VLLM_"))}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", RAY_CALIB_DEVICE="cpu", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def measure_args(
    model: Path, dataset: Path, out: Path, tp: int, *, fp8_kv: bool, new_tokens: int = 1, extra: tuple[str, ...] = ()
) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "ray_calib.cli",
        "measure",
        "-m",
        str(model),
        "-d",
        str(dataset),
        "-t",
        str(tp),
        "-n",
        str(NUM_PROMPTS),
        "-l",
        "24",
        "-b",
        str(CHUNK),
        "--chunk-size",
        str(CHUNK),
        "--max-new-tokens",
        str(new_tokens),
        "-o",
        str(out),
        *extra,
    ]
    return args + (["--fp8-kv"] if fp8_kv else [])


@dataclass
class Run:
    out: Path
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> Run:
        assert self.returncode == 0, f"measure failed ({self.returncode}):\n{self.stderr[-3000:]}"
        return self


def run_measure(args: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> Run:
    out = Path(args[args.index("-o") + 1])
    env = {"RAY_CALIB_RUN_DIR": str(out.parent), **(env or measure_env())}  # library logs: <out>/../logs
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return Run(out=out, returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)


@pytest.fixture(scope="session")
def tiny_models(tiny_model) -> dict[str, Path]:
    return {arch: tiny_model(arch) for arch in ("llama", "deepseek_v3")}


@pytest.fixture(scope="session")
def calib_set(tmp_path_factory) -> Path:
    from ray_calib.testing.tiny.calibset import make_calib_set

    return make_calib_set("pile", tmp_path_factory.mktemp("calib") / "pile.jsonl", num_samples=32)


@pytest.fixture(scope="session")
def permuted_models(tiny_models, tmp_path_factory):
    """`permuted_models(arch, seed)` -> the tiny model with its units permuted (see permute), built once."""
    from tests.measure.permute import permuted_copy

    root = tmp_path_factory.mktemp("permuted-models")
    built: dict[tuple[str, int], Path] = {}

    def get(arch: str, seed: int) -> Path:
        if (arch, seed) not in built:
            built[arch, seed] = permuted_copy(tiny_models[arch], root / f"{arch}-{seed}", seed=seed)
        return built[arch, seed]

    return get


@pytest.fixture(scope="session")
def measured(tiny_models, permuted_models, calib_set, tmp_path_factory):
    """`measured(arch, tp, fp8_kv, backend=None, permuted=0)` -> the finished Run, started once per session.

    backend None is vLLM's own choice on this CPU, and shares its run with that backend forced;
    permuted=K measures the copy permuted with seed K (0: the model itself). The tiny models are small enough
    that every run records hessians by default. Each run is a run directory of its own (`Run.out` is its
    measure/, beside it the run.json measure starts and logs/).
    """
    cache: dict[tuple, Run] = {}
    root = tmp_path_factory.mktemp("measure-runs")

    def get(arch: str, tp: int, fp8_kv: bool, backend: str | None = None, permuted: int = 0) -> Run:
        backend = backend or default_backend(arch)
        key = (arch, tp, fp8_kv, backend, permuted)
        if key not in cache:
            name = f"{arch}-tp{tp}-{'fp8kv' if fp8_kv else 'bf16kv'}-{backend or 'default'}-p{permuted}"
            model = permuted_models(arch, permuted) if permuted else tiny_models[arch]
            extra = ("--attention-backend", backend) if backend else ()
            cache[key] = run_measure(
                measure_args(model, calib_set, root / name / "measure", tp, fp8_kv=fp8_kv, extra=extra)
            ).check()
        return cache[key]

    return get
