"""infer and eval: the device guard and bad inputs quickly; real vLLM runs on a tiny model (slow)."""

import json
import os
import signal

import pytest

from ray_calib.errors import ModelError
from ray_calib.inc import RunMeta
from ray_calib.infer.runner import check_device_type, load_prompts


def test_device_guard(tmp_path):
    with pytest.raises(ModelError, match="measured on gaudi2 but this node is gaudi3.*--allow-device-mismatch"):
        check_device_type(RunMeta(device_type="gaudi2"), "gaudi3", allow_mismatch=False, where=tmp_path)
    check_device_type(RunMeta(device_type="gaudi2"), "gaudi3", allow_mismatch=True, where=tmp_path)
    check_device_type(RunMeta(device_type="cpu"), "cpu", allow_mismatch=False, where=tmp_path)
    check_device_type(None, "cpu", allow_mismatch=False, where=tmp_path)


def test_prompt_files(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text('first prompt\n\n{"prompt": "second"}\n{"text": "third"}\n')
    assert load_prompts(path) == ["first prompt", "second", "third"]
    path.write_text('{"other": 1}\n')
    with pytest.raises(ModelError, match=r"p.txt:1: JSON line without a 'prompt'"):
        load_prompts(path)
    with pytest.raises(ModelError, match="no such prompts file"):
        load_prompts(tmp_path / "missing.txt")


def test_infer_refuses_measurements_from_another_device(tmp_path, run_cli):
    from ray_calib.inc import write_meta

    model = tmp_path / "fp8"
    model.mkdir()
    (model / "config.json").write_text("{}")
    write_meta(model, RunMeta(device_type="gaudi2", tp_size=1))
    result = run_cli("infer", "--model", model, "--run-dir", tmp_path)
    assert result.exit_code != 0
    assert "measured on gaudi2 but this node is cpu" in result.stderr and result.stderr.count("\n") == 1


def test_infer_without_a_model_dir(tmp_path, run_cli):
    result = run_cli("infer", "--model", tmp_path / "nothing", "--run-dir", tmp_path)
    assert result.exit_code != 0 and "no config.json" in result.stderr


@pytest.fixture(scope="module")
def tiny_llama(tiny_model):
    return tiny_model("llama")


@pytest.mark.slow
def test_infer_generates_and_saves(tiny_llama, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    result = run_cli(
        "infer", "--model", tiny_llama, "--tp", 1, "--max-new-tokens", 4, "--run-dir", tmp_path, "--enforce-eager"
    )
    assert result.exit_code == 0, result.stderr
    completions = json.loads((tmp_path / "infer" / "completions.json").read_text())
    assert len(completions) == 4 and all(c["num_tokens"] == 4 for c in completions)


@pytest.mark.slow
def test_serve_answers_openai_completions_with_vllms_own_defaults(tiny_llama, tmp_path, run_cli, monkeypatch):
    """What plain `vllm serve` gives: no --enforce-eager, the model's whole context (1024, the KV cache holds it)."""
    from ray_calib.testing.localnodes import free_ports

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    port = free_ports(1)[0]
    result = run_cli(
        "infer",
        "--model",
        tiny_llama,
        "--serve",
        "--detach",
        "--port",
        port,
        "--run-dir",
        tmp_path,
        "--timeout",
        600,
        "--kv-cache-gib",
        0.25,
    )
    assert result.exit_code == 0, result.stderr
    pid = int(result.stdout.split("kill ")[-1].split()[0])
    try:
        assert f"http://127.0.0.1:{port}/v1" in result.stdout and "smoke test completion" in result.stdout
        shown = next(line for line in result.stdout.splitlines() if line.startswith("serving with: "))
        assert shown.startswith("serving with: vllm serve ")  # TP 1 needs no thread-binding variable
        assert shown.endswith(
            f"--served-model-name llama --tensor-parallel-size 1 --max-model-len auto "
            f"--kv-cache-memory-bytes {1 << 28} --kv-cache-dtype bfloat16"
        )  # BF16 KV stated explicitly
        assert "server reports max_model_len 1024" in result.stdout
    finally:
        os.killpg(pid, signal.SIGTERM)


def test_infer_refuses_a_context_beyond_the_models(tiny_llama, tmp_path, run_cli):
    result = run_cli("infer", "--model", tiny_llama, "--max-model-len", 4096, "--run-dir", tmp_path)
    assert result.exit_code != 0
    assert "--max-model-len 4096 is beyond the 1024-token context" in result.stderr
    assert result.stderr.count("\n") == 1


def test_eval_refuses_a_tp_the_heads_do_not_allow(tiny_llama, tmp_path, run_cli):
    result = run_cli("eval", "--baseline", tiny_llama, "--candidate", tiny_llama, "--tp", 3, "--run-dir", tmp_path)
    assert result.exit_code != 0
    assert "--tp 3 does not divide the 4 attention heads" in result.stderr and "use --tp 1 | 2 | 4" in result.stderr


@pytest.mark.slow
def test_eval_of_a_model_against_itself(tiny_llama, tmp_path):
    """As a user runs it (own process): the figures, and both streams hold our lines alone."""
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VLLM_"))}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", RAY_CALIB_DEVICE="cpu")
    args = ["eval", "--baseline", tiny_llama, "--candidate", tiny_llama, "--no-fp8-kv", "--min-agreement", 0.99]
    args += ["--run-dir", tmp_path, "--enforce-eager"]
    result = subprocess.run(
        [sys.executable, "-m", "ray_calib.cli", *map(str, args)], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["top1_agreement"] == {"candidate": 1.0}
    assert report["verdict"]["passed"] and report["verdict"]["min_agreement"] == 0.99  # what push checks
    assert report["mean_kl"]["candidate"] == pytest.approx(0.0, abs=1e-9)
    assert report["perplexity"]["candidate"] == pytest.approx(report["perplexity"]["baseline"])
    assert report["num_texts"] == 16 and report["num_positions"] > 4000, "no --texts: the built-in held-out set"
    assert "no --texts: scoring 16 held-out passages" in result.stderr
    assert "(1/2 score baseline)" in result.stderr and "(2/2 score candidate)" in result.stderr
    ours = {
        result.stdout: (r"note: ", r"variant ", r"(baseline|candidate)\s", r"\d+ positions over 16 texts; saved "),
        result.stderr: (r"no --texts: ", r"\(\d/2 score \w+\) \d+ windows", r"(baseline|candidate): scored in \d+ s"),
    }
    for stream, patterns in ours.items():
        for line in stream.splitlines():
            assert any(re.match(p, line) for p in patterns), f"not ours: {line!r}"
    assert "vllm" in (tmp_path / "logs" / "eval.log").read_text()  # the engines' own lines went there


def test_serve_args_are_vllms_defaults_plus_the_few_settings_we_own(tmp_path):
    from pathlib import Path

    from ray_calib.infer.runner import InferConfig, serve_args, serve_env

    cuda = InferConfig(model=Path("/m/fp8"), tp_size=8, device="cuda", fp8_kv=True)
    assert serve_args(cuda, host="0.0.0.0", port=8000) == [
        "serve",
        "/m/fp8",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--served-model-name",
        "fp8",
        "--tensor-parallel-size",
        "8",
        "--max-model-len",
        "auto",
        "--kv-cache-dtype",
        "fp8",
    ]
    from ray_calib.engine.launch import timeout_env

    assert serve_env(cuda) == timeout_env(1800)
    cpu = InferConfig(
        model=Path("/m/fp8"), tp_size=2, device="cpu", max_model_len=512, kv_cache_gib=0.5, enforce_eager=True
    )
    assert serve_args(cpu, host="h", port=1)[8:] == [
        "--tensor-parallel-size",
        "2",
        "--enforce-eager",
        "--max-model-len",
        "512",
        "--kv-cache-memory-bytes",
        str(1 << 29),
        "--kv-cache-dtype",
        "bfloat16",
    ]  # explicit: see kv_cache_dtype
    assert serve_env(cpu)["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"


def test_a_cpu_fp8_moe_checkpoint_serves_eager_and_a_dense_one_compiled(tmp_path):
    """The plugin's FP8 MoE emulation is a Python loop over experts that fullgraph torch.compile cannot trace."""
    import json
    from pathlib import Path

    from ray_calib.infer.runner import InferConfig, engine_config, profile_note

    quantized = {"quantization_config": {"quant_method": "compressed-tensors"}}
    for name, config in (
        ("moe", {"n_routed_experts": 8, **quantized}),
        ("dense", quantized),
        ("bf16-moe", {"n_routed_experts": 8}),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    eager = {
        name: engine_config(InferConfig(model=Path(tmp_path / name), tp_size=1, device="cpu")).enforce_eager
        for name in ("moe", "dense", "bf16-moe")
    }
    assert eager == {"moe": True, "dense": False, "bf16-moe": False}
    assert not engine_config(InferConfig(model=tmp_path / "moe", tp_size=1, device="cuda")).enforce_eager
    notes = {name: profile_note(InferConfig(model=tmp_path / name, tp_size=1, device="cpu")) for name in eager}
    assert notes["moe"].startswith("eager: ") and "torch.compile (inductor)" not in notes["moe"]  # says why
    assert "torch.compile (inductor)" in notes["dense"] and not notes["dense"].startswith("eager")
