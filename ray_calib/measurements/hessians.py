"""Input second moments of linear layers (`measure --hessians`), the statistic GPTQ rounding needs.

    hessians_<rank>_<world>.safetensors   one per measured rank: node name -> H = sum(x xᵀ) over the
                                          calibration tokens of that rank's layer input (float32)
    hessians.safetensors                  the whole model (what `unify` writes and `quantize` reads),
                                          independent of any TP size

Safetensors metadata: `tokens` (rows summed) and `sharded` (JSON list of the nodes whose input is split
across ranks). A column-parallel layer (q/k/v, gate/up) sees the whole input on every rank: every rank's
H is the same and rank 0's is kept. A row-parallel layer (o_proj, down_proj) sees its rank's slice of
the input: the whole-model H is block diagonal, the ranks' blocks in rank order (the correlations
between two ranks' slices are never seen by any rank; GPTQ then corrects within each slice).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_calib import atomic
from ray_calib.errors import MeasurementError

MODEL_FILE = "hessians.safetensors"
_RANK_RE = re.compile(r"^hessians_(\d+)_(\d+)\.safetensors$")


@dataclass
class Hessians:
    matrices: dict[str, Any]  # node name -> [in, in] float32 numpy array
    sharded: set[str] = field(default_factory=set)
    tokens: int = 0

    def add(self, other: Hessians) -> Hessians:
        """Sum of two runs over the same ranks (chunks of one measurement)."""
        merged = dict(self.matrices)
        for name, matrix in other.matrices.items():
            merged[name] = merged[name] + matrix if name in merged else matrix
        return Hessians(merged, self.sharded | other.sharded, self.tokens + other.tokens)


def rank_file_name(rank: int, world_size: int) -> str:
    return f"hessians_{rank}_{world_size}.safetensors"


def write(path: Path, hessians: Hessians) -> Path:
    from safetensors.numpy import save

    metadata = {"tokens": str(hessians.tokens), "sharded": json.dumps(sorted(hessians.sharded))}
    return atomic.write_bytes(path, save(hessians.matrices, metadata=metadata))


def read(path: Path) -> Hessians:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            matrices = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - not a dict
        return Hessians(matrices, set(json.loads(metadata.get("sharded", "[]"))), int(metadata.get("tokens", 0)))
    except (OSError, ValueError, SafetensorError) as err:
        raise MeasurementError(path, f"unreadable ({err})", fix="re-measure with --hessians.") from None


def rank_files(directory: Path) -> list[Path]:
    """The rank files of one run, in rank order; [] when the run was measured without --hessians."""
    found = {int(m[1]): (int(m[2]), p) for p in Path(directory).iterdir() if (m := _RANK_RE.match(p.name))}
    if not found:
        return []
    world_size = next(iter(found.values()))[0]
    if sorted(found) != list(range(world_size)) or any(w != world_size for w, _ in found.values()):
        raise MeasurementError(
            Path(directory),
            f"holds hessian files of ranks {sorted(found)}, not ranks 0..{world_size - 1} of one run",
            fix="re-measure with --hessians into an empty directory.",
        )
    return [found[rank][1] for rank in range(world_size)]


def merge_ranks(per_rank: list[Hessians]) -> Hessians:
    """The whole model's H from every rank's (see the module docstring)."""
    import numpy as np

    first = per_rank[0]
    matrices = {}
    for name, matrix in first.matrices.items():
        if name in first.sharded:
            blocks = [h.matrices[name] for h in per_rank]
            size = sum(b.shape[0] for b in blocks)
            whole = np.zeros((size, size), dtype=np.float32)
            start = 0
            for block in blocks:
                whole[start : start + block.shape[0], start : start + block.shape[0]] = block
                start += block.shape[0]
            matrices[name] = whole
        else:
            matrices[name] = matrix
    return Hessians(matrices, set(), first.tokens)


def load_model_hessians(directory: Path) -> Hessians | None:
    """The whole-model H of a measurement or unified directory; None when it has none."""
    directory = Path(directory)
    if (directory / MODEL_FILE).exists():
        return read(directory / MODEL_FILE)
    paths = rank_files(directory)
    return merge_ranks([read(p) for p in paths]) if paths else None


def remove_stale(directory: Path, keep: set[str]) -> None:
    """Hessian files of a replaced run (--force) go with its rank files."""
    for path in Path(directory).glob("hessians*.safetensors"):
        if path.name not in keep:
            path.unlink()


def unify(in_dir: Path, stage: Path) -> bool:
    """Write the whole-model file into a unify stage when the run has hessians; True if it did."""
    model = load_model_hessians(in_dir)
    if model is None:
        return False
    write(stage / MODEL_FILE, model)
    return True
