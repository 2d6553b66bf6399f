"""The FP8 checkpoint as vLLM runs it without calibrated KV-cache scales: k/v scale 1.0.

`eval` scores the FP8-KV candidate twice, with the k/v scales the checkpoint carries and without them, so
the calibrated scales are shown to beat what vLLM does with no scales (scale 1.0) or not. The copy is a
directory of symlinks to the candidate's files except: shards holding only k/v scales are left out, a shard
mixing them with other tensors is rewritten without them, and config.json / the index lose the KV scheme
and the scale names. With no `kv_cache_scheme`, vLLM's `--kv-cache-dtype fp8` keeps k_scale = v_scale = 1.0.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray_calib import atomic
from ray_calib.model.checkpoint import Checkpoint

KV_SCALE_SUFFIXES = (".k_scale", ".v_scale")  # ours (`<attn>.k_proj.k_scale`) and llm-compressor's (`<attn>.k_scale`)
INDEX = "model.safetensors.index.json"


def kv_scale_names(checkpoint: Checkpoint) -> list[str]:
    return [name for name in checkpoint.tensors if name.endswith(KV_SCALE_SUFFIXES)]


def without_kv_scales(model: Path, dest: Path) -> Path | None:
    """`dest`: `model` without its k/v scales; None (nothing written) when it carries none."""
    checkpoint = Checkpoint.open(model)
    scales = set(kv_scale_names(checkpoint))
    if not scales:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(model).iterdir()):
        if path.name in ("config.json", INDEX) or path.is_dir():
            continue
        if path.name in checkpoint.by_shard:
            names = {info.name for info in checkpoint.by_shard[path.name]}
            if names <= scales:
                continue
            if names & scales:
                _rewrite_shard(path, dest / path.name, scales)
                continue
        (dest / path.name).symlink_to(path.resolve())
    config = dict(checkpoint.config)
    quant = dict(config.get("quantization_config") or {})
    quant.pop("kv_cache_scheme", None)
    config["quantization_config"] = quant
    atomic.write_json(dest / "config.json", config)
    if (Path(model) / INDEX).exists():
        index = json.loads((Path(model) / INDEX).read_text())
        index["weight_map"] = {n: s for n, s in index.get("weight_map", {}).items() if n not in scales}
        atomic.write_json(dest / INDEX, index)
    return dest


def _rewrite_shard(source: Path, dest: Path, drop: set[str]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys() if name not in drop}  # noqa: SIM118
    save_file(tensors, str(dest), metadata=metadata)
