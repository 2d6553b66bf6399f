"""A GGUF file -> a BF16 safetensors Llama model that vLLM and `ray-calib` take like any checkpoint.

    1. check    the file is GGUF and its `general.architecture` is Llama-family (read from the header
                by a small reader here: the `gguf` package parses the whole tokenizer, ~15 s)
    2. load     transformers dequantizes the GGUF weights to BF16 (through the `gguf` package)
    3. rebuild  a clean `LlamaForCausalLM` from the config without the gguf `quantization_config`
                (which blocks `save_pretrained`), the state dict loaded into it
    4. save     `model.safetensors`, `config.json`, `generation_config.json`, tokenizer files with the
                chat template, and `.ray-calib-import.json` naming the source file and its size
The directory is staged and renamed into place, so an interrupted import leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ray_calib import atomic
from ray_calib.errors import ModelError, OutputExistsError

# `general.architecture` values transformers builds as LlamaForCausalLM (Mistral GGUFs say "llama" too).
LLAMA_FAMILY = ("llama",)
MARKER = ".ray-calib-import.json"
_MAGIC = b"GGUF"
# GGUF value types -> struct format of one scalar (8 = string, 9 = array are read apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class ImportedModel:
    path: Path
    source: Path
    architecture: str
    num_parameters: int
    size_bytes: int


def gguf_architecture(path: Path) -> str:
    """`general.architecture` from a GGUF header; a file that is not GGUF is a one-line error."""
    try:
        with open(path, "rb") as file:
            if file.read(4) != _MAGIC:
                raise ModelError(
                    f"{path}: not a GGUF file (no 'GGUF' magic at the start)",
                    fix="pass a .gguf model file, e.g. one from llama.cpp's converters.",
                )
            _version, _tensors, count = struct.unpack("<IQQ", file.read(20))
            for _ in range(count):
                key = _read_string(file)
                kind = struct.unpack("<I", file.read(4))[0]
                if key == "general.architecture" and kind == _STRING:
                    return _read_string(file)
                _skip_value(file, kind)
    except (struct.error, UnicodeDecodeError, ValueError):
        pass
    except FileNotFoundError:
        raise ModelError(f"{path}: no such GGUF file", fix="pass an existing .gguf file.") from None
    raise ModelError(
        f"{path}: GGUF header without a readable general.architecture (truncated file?)",
        fix="re-download or re-convert the GGUF file.",
    )


def _read_string(file) -> str:
    (length,) = struct.unpack("<Q", file.read(8))
    if length > 1 << 24:
        raise ValueError("implausible string length")
    return file.read(length).decode("utf-8")


def _skip_value(file, kind: int) -> None:
    if kind == _STRING:
        _read_string(file)
    elif kind == _ARRAY:
        item_kind, count = struct.unpack("<IQ", file.read(12))
        if item_kind in _SCALARS:
            file.seek(struct.calcsize(_SCALARS[item_kind]) * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(file, item_kind)
    elif kind in _SCALARS:
        file.seek(struct.calcsize(_SCALARS[kind]), os.SEEK_CUR)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")


def check_llama_family(path: Path) -> str:
    architecture = gguf_architecture(path)
    if architecture not in LLAMA_FAMILY:
        raise ModelError(
            f"{path}: GGUF architecture '{architecture}' is not a Llama-family model",
            fix=f"import-gguf rebuilds Llama models only (general.architecture {', '.join(LLAMA_FAMILY)}).",
        )
    return architecture


def import_gguf(gguf: Path, out: Path, *, force: bool = False) -> ImportedModel:
    """Dequantize `gguf` to a BF16 safetensors model directory `out` (see the module docstring)."""
    gguf = Path(gguf)
    architecture = check_llama_family(gguf)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out}: is not empty", fix="choose another --out or pass --force.")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.import-", dir=out.parent))
    try:
        num_parameters = _convert(gguf, stage)
        atomic.write_json(stage / MARKER, source_stamp(gguf))
        stage.chmod(0o755)  # mkdtemp made it private; a model directory is not
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return ImportedModel(out, gguf, architecture, num_parameters, size)


def source_stamp(gguf: Path) -> dict:
    """What identifies the import's input: a different file or size means a different model."""
    return {"gguf": Path(gguf).name, "size": Path(gguf).stat().st_size, "format": 1}


def _convert(gguf: Path, stage: Path) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its per-tensor progress bars and dtype advice are noise here
    hf_logging.disable_progress_bar()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, OSError, KeyError) as err:
        raise ModelError(
            f"{gguf}: transformers could not read this GGUF ({str(err).splitlines()[0][:200]})",
            fix="check the file; quantization types transformers cannot dequantize are refused.",
        ) from None
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    settings["architectures"] = ["LlamaForCausalLM"]
    config = LlamaConfig.from_dict(settings)
    config.dtype = torch.bfloat16
    clean = LlamaForCausalLM(config).to(torch.bfloat16)
    clean.load_state_dict(loaded.state_dict())
    clean.generation_config = loaded.generation_config
    clean.save_pretrained(stage, safe_serialization=True)
    tokenizer.save_pretrained(stage)
    return sum(p.numel() for p in clean.parameters())
