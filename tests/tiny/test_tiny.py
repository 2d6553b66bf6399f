"""Tiny models and synthetic calibration sets: built for real, checked from the files they leave."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from ray_calib.cli import cli
from ray_calib.testing.tiny.model import CONFIGS, VOCAB_SIZE


@pytest.fixture(scope="module")
def models(tiny_model) -> dict[str, Path]:
    """Built through the test cache; test_same_seed_same_bytes compares a fresh build with it."""
    return {arch: tiny_model(arch) for arch in CONFIGS}


def _tensor_names(model_dir: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as handle:
        return {k: handle.get_slice(k).get_shape() for k in handle.keys()}


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_r1"])
def test_deepseek_checkpoint_has_mla_moe_and_per_expert_weights(models, arch):
    config = json.loads((models[arch] / "config.json").read_text())
    assert config["topk_method"] == "noaux_tc" and config["scoring_func"] == "sigmoid"
    assert config["num_attention_heads"] >= 4 and config["num_key_value_heads"] >= 4
    assert config["kv_lora_rank"] + config["qk_rope_head_dim"] == 576  # vLLM CPU MLA decode kernel
    names = _tensor_names(models[arch])
    dense, moe = config["first_k_dense_replace"], config["num_hidden_layers"]
    assert f"model.layers.{dense - 1}.mlp.gate_proj.weight" in names
    for layer in range(dense, moe):
        for expert in range(config["n_routed_experts"]):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight" in names
        assert f"model.layers.{layer}.mlp.shared_experts.down_proj.weight" in names
        assert f"model.layers.{layer}.mlp.gate.e_score_correction_bias" in names
    assert names["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"][0] == 576
    assert names["model.embed_tokens.weight"] == [VOCAB_SIZE, config["hidden_size"]]


def test_deepseek_r1_stand_in_routes_like_r1_and_shards_at_tp16(models):
    from ray_calib.engine.sizing import ModelShape, valid_tp_sizes

    config = json.loads((models["deepseek_r1"] / "config.json").read_text())
    assert (config["num_attention_heads"], config["n_routed_experts"], config["num_experts_per_tok"]) == (16, 256, 8)
    assert (config["n_group"], config["topk_group"], config["n_shared_experts"]) == (8, 4, 1)
    assert config["first_k_dense_replace"] >= 2 and config["num_hidden_layers"] > config["first_k_dense_replace"]
    assert valid_tp_sizes(ModelShape.from_config(config)) == [1, 2, 4, 8, 16]


def test_llama_checkpoint_is_bf16_with_tp4_divisible_heads(models):
    from safetensors import safe_open

    config = json.loads((models["llama"] / "config.json").read_text())
    assert config["num_key_value_heads"] % 4 == 0 and config["head_dim"] >= 64
    with safe_open(str(models["llama"] / "model.safetensors"), "pt") as handle:
        dtypes = {handle.get_slice(k).get_dtype() for k in handle.keys()}
        weight = handle.get_tensor("model.layers.0.self_attn.q_proj.weight").float()
    assert dtypes == {"BF16"}
    assert 0 < weight.std().item() < 0.1  # random init, not zeros


def test_tokenizer_matches_config_and_has_a_chat_template(models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(models["deepseek_v3"]))
    config = json.loads((models["deepseek_v3"] / "config.json").read_text())
    assert len(tokenizer) <= config["vocab_size"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config["bos_token_id"], config["eos_token_id"])
    text = "The router counts every expert at eight ranks."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) < len(text) / 2  # BPE learned the corpus words
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "system", "content": "S."}, {"role": "user", "content": "Q?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert chat == "<|begin|><|system|>S.<|end|><|user|>Q?<|end|><|assistant|>"


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, models):
    from ray_calib.testing.tiny.model import make_tiny_model

    again = make_tiny_model("llama", tmp_path / "again").path
    other = make_tiny_model("llama", tmp_path / "other", seed=1).path
    original = (models["llama"] / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == original
    assert (other / "model.safetensors").read_bytes() != original


def test_cli_refuses_a_non_empty_out(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = CliRunner().invoke(cli, ["make-tiny-model", "--arch", "llama", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--force" in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("fmt,name", [("pile", "c.jsonl"), ("tc", "c.jsonl"), ("mlcommons", "c.pkl")])
def test_make_calib_set_writes_each_format(tmp_path, fmt, name):
    out = tmp_path / name
    result = CliRunner().invoke(cli, ["make-calib-set", "--format", fmt, "--out", str(out), "--num-samples", "5"])
    assert result.exit_code == 0, result.output
    if fmt == "mlcommons":
        import pandas as pd

        frame = pd.read_pickle(out)
        assert len(frame) == 5 and {"system_prompt", "question"} <= set(frame.columns)
        assert all(isinstance(q, str) and q for q in frame["question"])
        return
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5
    if fmt == "pile":
        assert all(isinstance(r["text"], str) and r["text"] for r in rows)
    else:
        assert all(isinstance(r, list) and r[-1]["role"] == "user" for r in rows)


def test_commands_module_imports_no_heavy_packages():
    code = (
        "import sys, ray_calib.testing.commands; "
        "print(sorted(m for m in ('torch', 'transformers', 'tokenizers', 'pandas', 'safetensors') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


_GENERATE = textwrap.dedent("""
    import sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        llm = LLM(model=sys.argv[1], enforce_eager=True, max_model_len=256, dtype="bfloat16")
        prompt = llm.get_tokenizer().apply_chat_template(
            [{"role": "user", "content": "What is memory?"}], tokenize=False, add_generation_prompt=True)
        out = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        print("TOKENS", len(out[0].outputs[0].token_ids))
""")


# the R1 shape is loaded only here; Llama and V3 are loaded by the measure and quantize tests too
LOADED_ELSEWHERE = {"llama", "deepseek_v3"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch", [pytest.param(a, marks=[pytest.mark.extended] if a in LOADED_ELSEWHERE else []) for a in sorted(CONFIGS)]
)
def test_vllm_cpu_loads_and_generates(models, arch, tmp_path):
    script = tmp_path / "generate.py"
    script.write_text(_GENERATE)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    run = subprocess.run(
        [sys.executable, str(script), str(models[arch])], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "TOKENS 6" in run.stdout
