"""Bad inputs to `ray-calib measure` end in one `error:` line naming the problem and the fix, before vLLM starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


def one_error_line(result) -> str:
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def test_missing_model_dir(run_cli, calib_set, tmp_path):
    line = one_error_line(run_cli("measure", "-m", tmp_path / "nope", "-d", calib_set, "-o", tmp_path / "out"))
    assert "nope does not exist" in line and "config.json" in line


def test_tp_not_dividing_heads(run_cli, tiny_models, calib_set, tmp_path):
    line = one_error_line(
        run_cli("measure", "-m", tiny_models["llama"], "-d", calib_set, "-t", 3, "-o", tmp_path / "o")
    )
    assert "--tp 3 does not divide the 4 attention heads" in line and "use --tp 1 | 2 | 4" in line


def test_tp_too_small_for_memory(run_cli, tiny_models, calib_set, tmp_path):
    """A 405B-sized config (no weights needed: the pre-check sizes it from config.json) on this host."""
    big = tmp_path / "big"
    shutil.copytree(tiny_models["llama"], big, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((big / "config.json").read_text())
    config.update(
        hidden_size=16384,
        num_hidden_layers=126,
        intermediate_size=53248,
        num_attention_heads=128,
        num_key_value_heads=8,
        head_dim=128,
    )
    (big / "config.json").write_text(json.dumps(config))
    line = one_error_line(run_cli("measure", "-m", big, "-d", calib_set, "-t", 2, "-o", tmp_path / "o"))
    assert "TP 2 needs" in line and "GiB per rank" in line and ("--tp" in line or "add nodes" in line)
    assert not (tmp_path / "o").exists(), "nothing is written before the checks pass"


def test_empty_dataset_after_filtering(run_cli, tiny_models, calib_set, tmp_path):
    line = one_error_line(
        run_cli("measure", "-m", tiny_models["llama"], "-d", calib_set, "-l", 100000, "-o", tmp_path / "o")
    )
    assert "no samples left" in line


def test_refuses_to_overwrite_a_finished_measurement(run_cli, tiny_models, calib_set, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "inc_measure_output_hooks_maxabs_0_1.json").write_text("{}")
    line = one_error_line(run_cli("measure", "-m", tiny_models["llama"], "-d", calib_set, "-o", out))
    assert "already holds a measurement" in line and "--force" in line


def test_resume_without_checkpoints(run_cli, tiny_models, calib_set, tmp_path):
    line = one_error_line(
        run_cli("measure", "-m", tiny_models["llama"], "-d", calib_set, "-o", tmp_path / "o", "--resume")
    )
    assert "no checkpoints" in line


@pytest.mark.parametrize("flag", ["--batch-size", "--chunk-size", "--max-new-tokens"])
def test_non_positive_sizes(run_cli, tiny_models, calib_set, tmp_path, flag):
    line = one_error_line(run_cli("measure", "-m", tiny_models["llama"], "-d", calib_set, flag, 0))
    assert flag in line


def test_force_replaces_the_old_run_instead_of_mixing_two(tmp_path):
    """A forced TP1 dense run over a TP2 MoE run leaves exactly one run (and no stale coverage.json)."""
    from types import SimpleNamespace

    from ray_calib.inc import MeasurementSet, RankFile, StatsName
    from ray_calib.inc.naming import MEASURE_PREFIX
    from ray_calib.measure.chunks import ChunkResult
    from ray_calib.measure.run import MeasureConfig, _check_out, _write

    info = SimpleNamespace(model_id="m", revision=None)
    plan = SimpleNamespace(
        info=info, target=SimpleNamespace(device="cpu", device_type="cpu"), backend="observers", ep_size=1, fp8_kv=False
    )
    calib = SimpleNamespace(dataset_hash="h", prompts=[1], report=SimpleNamespace(summary=lambda: "s"))
    for world, experts in ((2, {"m": [3, 0]}), (1, {})):
        config = MeasureConfig(model="m", dataset=tmp_path / "d.jsonl", out=tmp_path / "out", force=True)
        _check_out(config)
        rank_files = [
            RankFile(
                name=StatsName(MEASURE_PREFIX, rank=r, world_size=world),
                nodes={"a": {"inputs": [[[1.0]]]}},
                mod_list=["a"],
            )
            for r in range(world)
        ]
        _write(
            config,
            plan,
            "uni",
            calib,
            [ChunkResult(index=0, rank_files=rank_files, experts=experts, num_tokens=10, num_prompts=1)],
            0.0,
            SimpleNamespace(backends={}, check=lambda rank_files: None),
        )
    assert MeasurementSet.discover(tmp_path / "out").world_size == 1
    assert not (tmp_path / "out" / "coverage.json").exists()


def test_prompts_longer_than_the_context_are_refused_before_the_engine(run_cli, tiny_models, calib_set, tmp_path):
    result = run_cli(
        "measure",
        "--model",
        tiny_models["llama"],
        "--dataset",
        calib_set,
        "--max-model-len",
        4,
        "--out",
        tmp_path / "m",
    )
    line = one_error_line(result)
    assert "the longest prompt has" in line and "--max-model-len" in line


def test_gaudi_measure_uses_the_users_quant_config(tmp_path):
    """--quant-config reaches INC on Gaudi too (its blocklist kept), writing stats where we gather them."""
    from types import SimpleNamespace

    from ray_calib.errors import ConfigError
    from ray_calib.measure.gaudi import measure_quant_config

    info = SimpleNamespace(moe=False)
    user = json.loads((Path(__file__).parents[2] / "configs" / "inc_measure_config.json").read_text())
    user["blocklist"] = {"names": ["lm_head", "my_layer"], "types": []}
    (tmp_path / "mine.json").write_text(json.dumps(user))
    config = measure_quant_config(False, info, "/tmp/dump", tmp_path / "mine.json")
    assert config["blocklist"]["names"] == ["lm_head", "my_layer"]
    assert config["dump_stats_path"] == "/tmp/dump/inc_measure_output" and config["mode"] == "MEASURE"
    assert "my_layer" not in measure_quant_config(False, info, "/tmp/dump", None)["blocklist"]["names"]
    with pytest.raises(ConfigError, match="--fp8-kv, but its blocklist blocks the KV cache types"):
        measure_quant_config(True, info, "/tmp/dump", Path(__file__).parents[2] / "configs" / "inc_measure_config.json")


def test_tp_16_on_a_model_with_4_heads_names_the_tps_that_would(run_cli, tiny_models, calib_set, tmp_path):
    line = one_error_line(
        run_cli("measure", "-m", tiny_models["deepseek_v3"], "-d", calib_set, "-t", 16, "-o", tmp_path / "o")
    )
    assert "--tp 16 does not divide the 4 attention heads" in line and "use --tp 1 | 2 | 4" in line


def test_max_model_len_beyond_the_models_context(run_cli, tiny_models, calib_set, tmp_path):
    line = one_error_line(
        run_cli("measure", "-m", tiny_models["llama"], "-d", calib_set, "--max-model-len", 4096, "-o", tmp_path / "o")
    )
    assert "--max-model-len 4096 is beyond the 1024-token context" in line and "--max-model-len 1024 or less" in line


def test_kv_cache_gib_must_be_positive(run_cli, tiny_models, calib_set, tmp_path):
    result = run_cli("measure", "-m", tiny_models["llama"], "-d", calib_set, "--kv-cache-gib", 0, "-o", tmp_path / "o")
    assert result.exit_code != 0 and "--kv-cache-gib" in result.stderr and "more than 0 GiB" in result.stderr


def test_an_unknown_attention_backend_is_a_one_line_error():
    """Found by pyflakes: the refusal named an error class the module never imported (a NameError traceback)."""
    pytest.importorskip("vllm")
    from ray_calib.errors import ConfigError
    from ray_calib.measure.preflight import check_attention_backend

    with pytest.raises(ConfigError, match="--attention-backend BOGUS is not a vLLM attention backend") as err:
        check_attention_backend("BOGUS")
    assert "CPU_" in (err.value.fix or "")
    check_attention_backend(None)


def test_dataset_hint_names_a_flag_measure_has(run_cli, tiny_models, tmp_path):
    """The format hint says `--format`; measure takes it, and with it reads a file of any suffix."""
    data = tmp_path / "calib.csv"
    data.write_text("".join(f"sample {i} of plain calibration text for the tiny model\n" for i in range(8)))
    model = tiny_models["llama"]
    line = one_error_line(run_cli("measure", "-m", model, "-d", data, "-o", tmp_path / "o"))
    assert "cannot tell the dataset format" in line and "--format" in line
    help_text = run_cli("measure", "--help").stdout
    assert all(flag in help_text for flag in ("--format", "pile", "mlcommons", "tc"))
    ok = run_cli("measure", "-m", model, "-d", data, "--format", "pile", "-n", 4, "--dry-run", "-o", tmp_path / "o")
    assert ok.exit_code == 0, ok.stderr
    assert "[pile]" in ok.stdout + ok.stderr and not (tmp_path / "o").exists()
