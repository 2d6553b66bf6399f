"""config.json of a Hugging Face model directory: the facts every stage asks (experts, attention kind)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ray_calib.errors import ModelError


def read_json(path: Path, kind: type = dict):
    """A model's JSON file (config, index); broken or of the wrong kind = one-line ModelError."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: not valid JSON ({err})", fix="restore it from the model's source.") from None
    if not isinstance(data, kind):
        raise ModelError(f"{path}: expected a JSON {kind.__name__}", fix="restore it from the model's source.")
    return data


def model_config(model_dir: str | os.PathLike) -> dict:
    """config.json of a model directory ({} when it has none, e.g. a bare directory of shards)."""
    path = Path(model_dir) / "config.json"
    return read_json(path) if path.exists() else {}


def num_routed_experts(config: dict) -> int:
    """Routed experts per MoE layer under any of the names model families use (0: a dense model).

    Multimodal configs (Llama-4) keep the language model's numbers under `text_config`.
    """
    config = config.get("text_config") or config
    return config.get("n_routed_experts") or config.get("num_local_experts") or config.get("num_experts") or 0


def is_mla(config: dict) -> bool:
    """Multi-head latent attention (DeepSeek-V2/V3/R1): one latent KV cache instead of K and V."""
    config = config.get("text_config", config)
    return bool(config.get("kv_lora_rank"))
