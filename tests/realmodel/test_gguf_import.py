"""import-gguf: the architecture check on hand-written GGUF headers (fast), the real SmolLM2 import (slow)."""

import json
import struct

import pytest

from ray_calib.errors import ModelError
from ray_calib.realmodel.gguf_import import check_llama_family, gguf_architecture


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def write_gguf(path, architecture: str, *, truncate: int | None = None):
    """A GGUF v3 header: an array and a scalar before general.architecture, as real files have."""
    kvs = [
        _string("general.type") + struct.pack("<I", 8) + _string("model"),
        _string("general.languages") + struct.pack("<IIQ", 9, 8, 2) + _string("en") + _string("fr"),
        _string("llama.block_count") + struct.pack("<II", 4, 30),
        _string("tokenizer.scores") + struct.pack("<IIQ", 9, 6, 3) + struct.pack("<3f", 0.0, -1.0, -2.0),
        _string("general.architecture") + struct.pack("<I", 8) + _string(architecture),
    ]
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs)
    path.write_bytes(data[:truncate])
    return path


def test_architecture_is_read_from_the_header(tmp_path):
    assert gguf_architecture(write_gguf(tmp_path / "m.gguf", "llama")) == "llama"
    assert check_llama_family(write_gguf(tmp_path / "m.gguf", "llama")) == "llama"


def test_a_gguf_of_another_family_fails_with_one_line(tmp_path, run_cli):
    path = write_gguf(tmp_path / "qwen.gguf", "qwen2")
    with pytest.raises(ModelError, match="GGUF architecture 'qwen2' is not a Llama-family model"):
        check_llama_family(path)
    result = run_cli("import-gguf", "--gguf", path, "--out", tmp_path / "out")
    assert result.exit_code != 0
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "qwen2" in result.stderr and "Llama" in result.stderr
    assert not (tmp_path / "out").exists()


def test_not_a_gguf_and_a_truncated_one_fail_with_one_line(tmp_path, run_cli):
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    result = run_cli("import-gguf", "--gguf", tmp_path / "model.safetensors", "--out", tmp_path / "out")
    assert result.exit_code != 0 and "not a GGUF file" in result.stderr and result.stderr.count("\n") == 1
    with pytest.raises(ModelError, match="without a readable general.architecture"):
        gguf_architecture(write_gguf(tmp_path / "cut.gguf", "llama", truncate=60))
    with pytest.raises(ModelError, match="no such GGUF file"):
        gguf_architecture(tmp_path / "absent.gguf")


@pytest.mark.slow
def test_smollm2_is_imported_once_as_a_clean_bf16_llama(tmp_path, run_cli):
    from safetensors import safe_open

    from ray_calib.realmodel import smollm2

    result = run_cli("import-gguf")  # the cache the demo and the other tests use
    assert result.exit_code == 0, result.stderr
    path, built = smollm2.model_dir()
    assert not built  # the second request finds it
    assert str(path) in result.stdout
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert config["tie_word_embeddings"] and config["vocab_size"] == 49152
    with safe_open(str(path / "model.safetensors"), "pt") as shards:
        names = list(shards.keys())
        assert {str(shards.get_slice(n).get_dtype()) for n in names} == {"BF16"}
    assert len([n for n in names if n.endswith("q_proj.weight")]) == 30
    assert (path / "tokenizer.json").is_file() and "chat_template" in (
        (path / "tokenizer_config.json").read_text() + "".join(p.name for p in path.glob("chat_template*"))
    )
