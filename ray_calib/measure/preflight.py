"""Everything checked before a process starts: model directory, TP vs heads, memory, blocklist, cluster."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ray_calib.cluster import connect, devices, state
from ray_calib.engine import sizing
from ray_calib.errors import ConfigError, ModelError
from ray_calib.inc.quant_config import build_config, read_config
from ray_calib.model.config import is_mla, read_json


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    model_id: str  # what the user passed (hub id or path)
    revision: str | None
    num_kv_heads: int
    model_type: str
    shape: sizing.ModelShape  # heads, experts, widths, context: what decides the TP sizes it allows
    mla: bool = False  # multi-head latent attention (one latent KV cache)

    @property
    def num_heads(self) -> int:
        return self.shape.num_heads

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer (0: dense)."""
        return self.shape.num_experts

    @property
    def moe(self) -> bool:
        return self.shape.num_experts > 0

    @property
    def max_positions(self) -> int | None:
        """config.json max_position_embeddings."""
        return self.shape.max_positions


def resolve_model(model: str, *, weights: bool = True) -> ModelInfo:
    """A local HF directory, or a hub id ("org/name") fetched into the HF cache (without the weights when
    `weights` is False, e.g. for a dry run)."""
    path = Path(model).expanduser()
    model_id = model
    if path.exists():  # absolute: ranks on other nodes resolve paths against their own cwd, later commands too
        path = path.absolute()
        model_id = str(path)
    else:
        if _looks_like_hub_id(model):
            path = _download(model, weights=weights)
        else:
            raise ModelError(
                f"model directory {model} does not exist",
                fix="pass a local Hugging Face model directory (with config.json) or a hub id ORG/NAME.",
            )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(
            f"{path}: no config.json, not a Hugging Face model directory",
            fix="pass the directory that holds config.json and the *.safetensors files.",
        )
    config = read_json(config_path)
    heads = config.get("num_attention_heads")
    if not isinstance(heads, int):
        raise ModelError(
            f"{config_path}: no integer 'num_attention_heads'", fix="restore config.json from the model's source."
        )
    return ModelInfo(
        path=path,
        model_id=model_id,
        revision=_revision(path),
        num_kv_heads=config.get("num_key_value_heads", heads),
        model_type=str(config.get("model_type", "")),
        shape=sizing.ModelShape.from_config(config),
        mla=is_mla(config),
    )


def valid_tp_sizes(info: ModelInfo, limit: int = sizing.MAX_TP) -> list[int]:
    return sizing.valid_tp_sizes(info.shape, limit)


def check_tp(info: ModelInfo, tp_size: int) -> None:
    sizing.check_tp(info.shape, tp_size, info.model_id)


def check_attention_backend(name: str | None) -> None:
    """A forced attention backend must be one vLLM knows (it would otherwise fail after loading the model)."""
    if name is None:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    known = list(AttentionBackendEnum.__members__)
    if name not in known:
        cpu = " | ".join(k for k in known if k.startswith(("CPU_", "AMX_")))
        raise ConfigError(
            f"--attention-backend {name} is not a vLLM attention backend",
            fix=f"use one of vLLM's AttentionBackendEnum names, e.g. {cpu} on CPU.",
        )


def blocklist(quant_config: Path | None, *, fp8_kv: bool, moe: bool) -> tuple[list[str], list[str]]:
    """(names, types) the observers skip: the run's QUANT_CONFIG, else the seeds' measure defaults."""
    if quant_config is None:
        config = build_config(measure=True, fp8_kv=fp8_kv, one_node=False, dump_stats_path="unused", moe=moe)
    else:
        config = read_config(quant_config)
    section = config.get("blocklist") or {}
    return list(section.get("names", [])), list(section.get("types", []))


def cluster_address(conf: Path | None) -> str | None:
    """The address of the cluster `ray-calib up` started for `conf` (or ./devices.conf), else RAY_ADDRESS, else None.

    An explicit --conf must be up (connect() raises a one-line error naming the dead node);
    an implicit ./devices.conf is used only when its cluster is up.
    """
    explicit = conf or os.environ.get("RAY_CALIB_DEVICES_CONF")
    if explicit:
        return connect(explicit)
    if Path("devices.conf").is_file():
        record = state.read(devices.load("devices.conf").path)
        if record and record.get("status") == "up":
            return connect("devices.conf")
    return os.environ.get("RAY_ADDRESS") or None


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~", "/"))


def _download(model: str, *, weights: bool = True) -> Path:
    patterns = ["*.json", "*.model", "*.txt"] + (["*.safetensors"] if weights else [])
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as err:  # network, auth, missing repo: all one line for the user
        raise ModelError(
            f"cannot fetch {model} from the Hugging Face hub ({type(err).__name__}: {str(err).splitlines()[0]})",
            fix="check the id and HF_TOKEN, or pass a local model directory.",
        ) from None


def _revision(path: Path) -> str | None:
    """The hub commit when the directory is a snapshot in the HF cache (.../snapshots/<sha>)."""
    return path.name if path.parent.name == "snapshots" else None
