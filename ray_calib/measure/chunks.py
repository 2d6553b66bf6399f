"""Per-chunk checkpoints of a measurement, so a crash or a killed worker costs one chunk, not the run.

    <out>/.chunks/run.json            what the run is (model, dataset hash, TP, ...): resume must match it
    <out>/.chunks/chunk-00003/        one finished chunk: every rank's range file + chunk.json

A chunk directory is written under a temporary name and renamed into place, so it either exists
complete or not at all. Chunks merge by element-wise max (exact) and by adding token counts.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_calib import atomic
from ray_calib.errors import ConfigError, EngineError, MeasurementError, OutputExistsError
from ray_calib.inc import RankFile, StatsName, parse_name, read_rank_file, write_rank_file
from ray_calib.inc.jsonio import load as load_json
from ray_calib.measurements import hessians
from ray_calib.measurements.hessians import Hessians

CHUNKS_DIR = ".chunks"
_RUN_FILE = "run.json"
_CHUNK_FILE = "chunk.json"


@dataclass
class ChunkResult:
    index: int
    rank_files: list[RankFile]  # ordered by rank
    experts: dict[str, list[int]] = field(default_factory=dict)  # MoE op -> tokens per expert (rank 0)
    num_tokens: int = 0  # tokens through the model (prompt + generated)
    num_prompts: int = 0
    generated_tokens: int = 0
    backends: dict[str, list[str]] = field(default_factory=dict)  # vLLM attention backend / MoE kernel names
    hessians: list[Hessians] = field(default_factory=list)  # ordered by rank; [] without --hessians


def check_gathered_ranks(ranks: list[Any], world_size: int | None, chunk: int) -> None:
    """The stats gathered over collective_rpc come from exactly ranks 0..N-1 of N, each once, before any is written."""
    size = world_size or len(ranks)
    found = sorted(r if isinstance(r, int) else -1 for r in ranks)  # a missing rank id sorts first as -1
    if found != list(range(size)):
        raise EngineError(
            f"chunk {chunk}: gathered the stats of ranks {found} (-1: no rank id), expected exactly 0..{size - 1} "
            f"of world size {size}",
            fix="a worker answered twice or not at all: rerun with --resume (finished chunks are kept).",
        )


def rank_file_from_result(result: dict[str, Any], prefix: str) -> RankFile:
    """A worker's `ray_calib_collect` dict -> INC range file of that rank."""
    name = StatsName(prefix=prefix, rank=result["rank"], world_size=result["world_size"])
    return RankFile(name=name, nodes=result["nodes"], mod_list=result["mod_list"])


def hessians_from_result(result: dict[str, Any]) -> Hessians:
    """A worker's hessians, sent as the float32 bytes of each square H (bytes cross every vLLM executor
    as they are; a numpy array comes out of vLLM's msgpack as a [dtype, shape, buffer] list)."""
    import numpy as np

    matrices = {}
    for name, raw in result["hessians"].items():
        values = np.frombuffer(raw, dtype=np.float32)
        side = math.isqrt(values.size)
        matrices[name] = values.reshape(side, side)
    return Hessians(matrices, set(result["sharded"]), result["tokens"])


class ChunkStore:
    def __init__(self, out_dir: Path, fingerprint: dict[str, Any]) -> None:
        self.root = Path(out_dir) / CHUNKS_DIR
        self.fingerprint = fingerprint

    def prepare(self, *, resume: bool) -> list[int]:
        """Check existing checkpoints against this run; returns the indices of finished chunks to reuse."""
        run_file = self.root / _RUN_FILE
        for partial in self.root.glob(".chunk-*"):  # a chunk being written when the run was killed
            shutil.rmtree(partial, ignore_errors=True)
        if not run_file.exists():
            if resume and not self.root.exists():
                raise ConfigError(
                    f"--resume: {self.root.parent} holds no checkpoints of an unfinished run",
                    fix="drop --resume to start a new measurement.",
                )
            atomic.write_json(run_file, self.fingerprint)
            return []
        previous = self._load(run_file)
        if not resume:
            raise OutputExistsError(
                f"{self.root.parent} holds checkpoints of an unfinished measurement",
                fix=f"pass --resume to continue it, or delete {self.root} to start over.",
            )
        changed = sorted(k for k in set(previous) | set(self.fingerprint) if previous.get(k) != self.fingerprint.get(k))
        if changed:
            detail = ", ".join(f"{k}: {previous.get(k)!r} -> {self.fingerprint.get(k)!r}" for k in changed[:3])
            raise ConfigError(
                f"--resume: the checkpoints in {self.root} come from another run ({detail})",
                fix=f"use the same options as that run, or delete {self.root} to start over.",
            )
        return self.done()

    def done(self) -> list[int]:
        if not self.root.exists():
            return []
        return sorted(int(p.name.split("-")[1]) for p in self.root.glob("chunk-*") if (p / _CHUNK_FILE).exists())

    def write(self, chunk: ChunkResult) -> Path:
        final = self.root / f"chunk-{chunk.index:05d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.root))
        try:
            for rank_file in chunk.rank_files:
                write_rank_file(rank_file, tmp)
            for rank, rank_hessians in enumerate(chunk.hessians):
                hessians.write(tmp / hessians.rank_file_name(rank, len(chunk.hessians)), rank_hessians)
            info = {
                "index": chunk.index,
                "experts": chunk.experts,
                "num_tokens": chunk.num_tokens,
                "num_prompts": chunk.num_prompts,
                "generated_tokens": chunk.generated_tokens,
                "backends": chunk.backends,
                "names": [rf.name.stem for rf in chunk.rank_files],
            }
            atomic.write_json(tmp / _CHUNK_FILE, info)
            if final.exists():  # a stale partial chunk cannot exist (rename is atomic); a complete one is replaced
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def read(self, index: int, prefix: str) -> ChunkResult:
        directory = self.root / f"chunk-{index:05d}"
        info = self._load(directory / _CHUNK_FILE)
        rank_files = []
        for stem in info["names"]:
            parsed = _rank_name(stem)
            if parsed is None or parsed.prefix != prefix or parsed.method is not None:
                raise MeasurementError(
                    directory / _CHUNK_FILE,
                    f"names {stem}, expected prefix {prefix}",
                    fix=f"delete {self.root} and re-measure.",
                )
            rank_files.append(read_rank_file(directory, parsed))
        return ChunkResult(
            index=index,
            rank_files=rank_files,
            experts=info["experts"],
            num_tokens=info["num_tokens"],
            num_prompts=info["num_prompts"],
            generated_tokens=info["generated_tokens"],
            backends=info.get("backends", {}),
            hessians=[hessians.read(path) for path in hessians.rank_files(directory)],
        )

    def _load(self, path: Path) -> Any:
        """A checkpoint file cut short by a crash: a one-line error that says how to start over."""
        try:
            return load_json(path)[0]
        except MeasurementError as err:
            raise MeasurementError(
                path,
                err.message.removeprefix(f"{path}: "),
                fix=f"delete {self.root} and re-measure (or drop --resume).",
            ) from None

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _rank_name(stem: str) -> StatsName | None:
    """The rank file name a chunk.json lists, parsed like every other INC name; None if it is not one."""
    parsed = parse_name(stem + ".json")
    if parsed is None or parsed[1] != ".json" or parsed[0].rank is None:
        return None
    return parsed[0]
