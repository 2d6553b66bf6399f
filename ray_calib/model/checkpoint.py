"""A Hugging Face model directory seen as shards of tensors: index, headers, config, free disk space.

The one owner of safetensors indexes: every stage opens a model directory through here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_calib import atomic, ui
from ray_calib.errors import ModelError, OutputExistsError
from ray_calib.model.config import model_config, read_json
from ray_calib.model.safetensors_io import TensorInfo, file_sha256, read_header

INDEX_FILE = "model.safetensors.index.json"
# Small files a server or tokenizer needs besides the weights; copied as they are.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any]
    shards: list[str]  # file names, in order
    tensors: dict[str, TensorInfo] = field(default_factory=dict)  # every tensor, shard order then file order
    shard_of: dict[str, str] = field(default_factory=dict)
    by_shard: dict[str, list[TensorInfo]] = field(default_factory=dict)  # shard -> its tensors, file order

    @classmethod
    def open(cls, path: str | os.PathLike) -> Checkpoint:
        path = Path(path)
        if not path.is_dir():
            raise ModelError(
                f"{path}: model directory not found",
                fix="pass the directory holding config.json "
                "and *.safetensors (download it first, e.g. `huggingface-cli download ORG/NAME`).",
            )
        shards = _shard_names(path)
        checkpoint = cls(path=path, config=model_config(path), shards=shards)
        for shard in shards:
            tensors, _ = read_header(path / shard)
            for name, info in tensors.items():
                checkpoint.tensors[name] = info
                checkpoint.shard_of[name] = shard
            checkpoint.by_shard[shard] = list(tensors.values())
        return checkpoint

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    def tensors_in(self, shard: str) -> list[TensorInfo]:
        """The shard's tensors in file order (a lookup: quantize asks once per shard, ~160 shards x ~50k tensors)."""
        if shard not in self.by_shard:  # built by hand rather than by `open`
            self.by_shard[shard] = [info for name, info in self.tensors.items() if self.shard_of[name] == shard]
        return self.by_shard[shard]

    def fp8_evidence(self) -> str | None:
        """Why this looks already quantized (FP8), or None for a BF16/FP16/FP32 checkpoint."""
        quant = self.config.get("quantization_config")
        if isinstance(quant, dict):
            return f"config.json has quantization_config (quant_method '{quant.get('quant_method')}')"
        for name, info in self.tensors.items():
            if info.dtype.startswith("F8") or name.endswith("weight_scale_inv"):
                return f"tensor '{name}' is {info.dtype}"
        return None

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())


def source_fingerprint(checkpoint: Checkpoint) -> str:
    """What identifies the input of a conversion: every tensor's name, dtype, shape and shard, and each
    shard's size and mtime (a re-downloaded shard is a new input)."""
    digest = hashlib.sha256()
    for name, info in checkpoint.tensors.items():
        digest.update(f"{name}:{info.dtype}:{info.shape}:{checkpoint.shard_of[name]};".encode())
    for shard in checkpoint.shards:
        stat = (checkpoint.path / shard).stat()
        digest.update(f"{shard}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def open_manifest(out: Path, name: str, fingerprint: str, force: bool, what: str) -> dict:
    """The resume manifest in `out` (finished shards -> sha256) when it belongs to these inputs; an `out`
    holding another run is refused unless `force`, which starts afresh."""
    path = out / name
    if path.exists():
        try:
            manifest = json.loads(path.read_text())
        except ValueError:
            manifest = {}
        if manifest.get("fingerprint") == fingerprint:
            return manifest
        if not force:
            raise OutputExistsError(
                f"{out}: holds {what} of other inputs (model, measurements or method changed)",
                fix="pass --force to redo it, or choose another --out.",
            )
    elif out.exists() and any(out.glob("*.safetensors")) and not force:
        raise OutputExistsError(f"{out}: already holds safetensors files", fix="pass --force or choose another --out.")
    return {"fingerprint": fingerprint, "shards": {}}


def verified_shards(out: Path, manifest: dict) -> set[str]:
    """Shards whose file on disk still has the checksum recorded when it was finished."""
    return {
        shard
        for shard, digest in manifest["shards"].items()
        if (out / shard).exists() and file_sha256(out / shard) == digest
    }


def _shard_names(path: Path) -> list[str]:
    index = path / INDEX_FILE
    if index.exists():
        weight_map = read_json(index, dict).get("weight_map", {})
        shards = list(dict.fromkeys(weight_map.values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise ModelError(
                f"{path}: {INDEX_FILE} lists {missing[0]}, which is missing ({len(missing)} missing)",
                fix="finish the download (the index names every shard).",
            )
        return shards
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    if not shards:
        found = sorted(p.name for p in path.iterdir())[:5]
        raise ModelError(
            f"{path}: no *.safetensors files (found: {', '.join(found) or 'nothing'})",
            fix="point --model at a Hugging Face checkpoint saved as safetensors "
            "(convert .bin weights with save_pretrained(safe_serialization=True)).",
        )
    return shards


def write_index(out: Path, weight_map: dict[str, str], total_size: int) -> Path:
    ordered = dict(sorted(weight_map.items()))
    return atomic.write_json(out / INDEX_FILE, {"metadata": {"total_size": total_size}, "weight_map": ordered})


def copy_side_files(src: Path, out: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (src / name).exists():
            atomic.write_bytes(out / name, (src / name).read_bytes())
            copied.append(name)
    return copied


FreeSpace = Callable[[Path], int]


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that will hold `path` (its nearest existing parent)."""
    return atomic.free_bytes(path)


def clear_leftovers(out: Path) -> None:
    """Remove the temporaries a killed earlier run left in `out` (hidden partial shards), saying so."""
    count, size = atomic.remove_leftovers(out)
    if count:
        ui.note(f"removed {count} temporary file(s) ({_gb(size)}) an interrupted earlier run left in {out}")


def check_free_space(out: Path, needed: int, free: FreeSpace = free_bytes) -> None:
    """Refuse before writing when the output cannot fit; name our own leftovers when they are in the way.

    Callers remove the leftovers in `out` itself first (they are theirs); those of other runs in the run
    directory are only named: another command may still be writing them.
    """
    available = free(out)
    margin = 64 << 20  # headers, index, temp-file slack
    if needed + margin > available:
        found = atomic.leftovers(Path(out).absolute().parent, depth=3)
        ours = ""
        if found:
            shown = ", ".join(str(p) for p, _ in found[:3]) + (", ..." if len(found) > 3 else "")
            ours = (
                f"; {_gb(sum(size for _, size in found))} of the disk is {len(found)} temporary file(s) "
                f"left by interrupted ray-calib runs ({shown}): delete them if no ray-calib command is running"
            )
        raise ModelError(
            f"{out}: needs {_gb(needed + margin)} free for the output but the disk has {_gb(available)}{ours}",
            fix="free some space or choose --out on a larger disk; nothing was written.",
        )


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
