"""`quantize` on tiny real checkpoints: FP8 within rounding, fused groups, resumability, every bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ray_calib.convert.pipeline import QuantizeRequest, quantize_run  # noqa: E402
from ray_calib.convert.quantize import MANIFEST  # noqa: E402
from ray_calib.errors import ConfigError, MeasurementError, ModelError  # noqa: E402
from ray_calib.model.checkpoint import Checkpoint  # noqa: E402
from ray_calib.model.safetensors_io import ShardReader, file_sha256  # noqa: E402
from ray_calib.rundir import RunDir  # noqa: E402
from tests.convert.synthetic import write_measurements  # noqa: E402


def run_quantize(tmp_path: Path, model: Path, **options):
    meas = tmp_path / "run" / "measure"
    if not meas.exists():
        write_measurements(meas, model, world_size=2)
    options.setdefault("model", model)
    request = QuantizeRequest(run=RunDir.resolve(tmp_path / "run"), **options)
    return quantize_run(request)


def tensors(directory: Path) -> dict:
    checkpoint = Checkpoint.open(directory)
    out = {}
    for shard in checkpoint.shards:
        with ShardReader(directory / shard) as reader:
            out.update({name: reader.read(name) for name in reader.tensors})
    return out


@pytest.mark.parametrize("method", ["maxabs_arbitrary", "maxabs_pow2", "act_maxabs_pow2_weights_pcs_maxabs_pow2"])
def test_fp8_checkpoint_dequantizes_within_fp8_rounding(tmp_path, tiny_llama, method):
    result = run_quantize(tmp_path, tiny_llama, scale_method=method, fp8_kv=True, low_cpu_mem=True)
    out = result.summary.out
    assert out == tmp_path / "run" / "fp8"
    fp8, bf16 = tensors(out), tensors(tiny_llama)
    quantized = [n for n, t in fp8.items() if t.dtype == torch.float8_e4m3fn]
    assert len(quantized) == 4 * 7  # q, k, v, o, gate, up, down per layer
    for name in quantized:
        scale = fp8[name.replace(".weight", ".weight_scale")]
        restored = fp8[name].float() * scale
        reference = bf16[name].float()
        # e4m3 has 3 mantissa bits: relative error <= 2^-4 for normal values, plus the subnormal floor
        assert bool(((restored - reference).abs() <= reference.abs() / 16 + scale * 2.0**-9).all()), name
        assert fp8[name.replace(".weight", ".input_scale")].shape == (1,)
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert fp8[name].dtype == torch.bfloat16 and torch.equal(fp8[name], bf16[name])
    layer = "model.layers.1.self_attn"
    if "pcs" not in method:  # a fused group (q/k/v) shares one weight scale and one input scale
        assert (
            fp8[f"{layer}.q_proj.weight_scale"]
            == fp8[f"{layer}.k_proj.weight_scale"]
            == fp8[f"{layer}.v_proj.weight_scale"]
        )
    else:
        assert fp8[f"{layer}.q_proj.weight_scale"].shape == (256, 1)
    assert fp8[f"{layer}.q_proj.input_scale"] == fp8[f"{layer}.v_proj.input_scale"]
    assert fp8[f"{layer}.k_proj.k_scale"].dtype == torch.float32
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(fp8)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["kv_cache_scheme"]["type"] == "float"
    strategy = config["config_groups"]["group_0"]["weights"]["strategy"]
    assert strategy == ("channel" if "pcs" in method else "tensor")


def test_deepseek_fused_names_and_experts(tmp_path, tiny_deepseek):
    result = run_quantize(tmp_path, tiny_deepseek, scale_method="maxabs_pow2", fp8_kv=True)
    fp8 = tensors(result.summary.out)
    e = "model.layers.1.mlp.experts.3"
    assert fp8[f"{e}.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert fp8[f"{e}.gate_proj.weight_scale"] == fp8[f"{e}.up_proj.weight_scale"]
    a = "model.layers.0.self_attn"
    assert fp8[f"{a}.q_a_proj.weight_scale"] == fp8[f"{a}.kv_a_proj_with_mqa.weight_scale"]
    assert fp8["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16  # the router stays BF16
    assert not any(n.endswith("k_scale") for n in fp8)  # MLA: vLLM loads no KV scales from checkpoints
    assert any("MLA" in note for note in result.summary.notes)


def test_resume_skips_finished_shards_verified_by_checksum(tmp_path, tiny_llama):
    model = tmp_path / "sharded"
    shutil.copytree(tiny_llama, model)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(model, max_shard_size="2MB")
    (model / "model.safetensors").unlink(missing_ok=True)
    shards = Checkpoint.open(model).shards
    assert len(shards) >= 3

    class Interrupt(Exception):
        pass

    def stop_after_first(shard):
        raise Interrupt(shard)

    meas = tmp_path / "run" / "measure"
    write_measurements(meas, model, world_size=1)
    out = RunDir.resolve(tmp_path / "run").fp8
    from ray_calib.convert.plan import load_measurement
    from ray_calib.convert.quantize import QuantizeJob, quantize_checkpoint
    from ray_calib.inc.devices import get_device
    from ray_calib.inc.methods import get_method

    job = QuantizeJob(
        model=model,
        measurement=load_measurement(meas)[0],
        out=out,
        method=get_method("maxabs_pow2"),
        device=get_device("cpu"),
        on_shard_done=stop_after_first,
    )
    with pytest.raises(Interrupt):
        quantize_checkpoint(job)
    assert (out / shards[0]).exists() and not (out / shards[1]).exists()
    assert not (out / "model.safetensors.index.json").exists()
    (out / f".{shards[1]}.partial.tmp").write_bytes(b"half a shard")  # what a kill leaves behind
    job.on_shard_done = None
    summary = quantize_checkpoint(job)
    assert summary.shards_skipped == [shards[0]] and summary.shards_written == shards[1:]
    assert not (out / f".{shards[1]}.partial.tmp").exists(), "the next run removes what a kill left"
    digests = {s: file_sha256(out / s) for s in shards}
    (out / shards[1]).write_bytes(b"corrupted")  # a finished shard that no longer matches its checksum
    summary = quantize_checkpoint(job)
    assert summary.shards_written == [shards[1]] and file_sha256(out / shards[1]) == digests[shards[1]]
    assert json.loads((out / MANIFEST).read_text())["shards"] == digests


def test_name_mismatch_lists_both_sides(tmp_path, tiny_llama, tiny_deepseek):
    write_measurements(tmp_path / "run" / "measure", tiny_deepseek, world_size=1)
    with pytest.raises(ModelError) as err:
        run_quantize(tmp_path, tiny_llama)
    message = str(err.value)
    assert (
        "measured module(s) have no weights in the model (first: model.layers.0.self_attn.fused_qkv_a_proj" in message
    )
    assert "model weight(s) have no measurement (first: model.layers.0.self_attn.k_proj.weight" in message
    assert not (tmp_path / "run" / "fp8").exists()


def test_missing_rank(tmp_path, tiny_llama):
    meas = tmp_path / "run" / "measure"
    write_measurements(meas, tiny_llama, world_size=4)
    (meas / "inc_measure_output_hooks_maxabs_2_4.json").unlink()
    with pytest.raises(MeasurementError, match="rank\\(s\\) 2 of 4 missing"):
        run_quantize(tmp_path, tiny_llama)


def test_model_without_safetensors_and_fp8_model(tmp_path, tiny_llama):
    empty = tmp_path / "bin-model"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"x")
    write_measurements(tmp_path / "run" / "measure", tiny_llama)
    with pytest.raises(ModelError, match="no \\*.safetensors files \\(found: pytorch_model.bin\\)"):
        run_quantize(tmp_path, empty)
    done = run_quantize(tmp_path, tiny_llama, out=tmp_path / "fp8").summary.out
    with pytest.raises(ModelError, match="already quantized.*ray-calib convert-bf16 --in"):
        run_quantize(tmp_path, done, out=tmp_path / "again")


def test_not_enough_disk_is_checked_before_writing(tmp_path, tiny_llama):
    with pytest.raises(ModelError, match="needs .* free for the output but the disk has 1.0 MB.*nothing was written"):
        run_quantize(tmp_path, tiny_llama, free_space=lambda path: 1_000_000)
    assert not (tmp_path / "run" / "fp8").exists()


def test_cli_quantize_from_run_dir_without_paths(tmp_path, tiny_llama, run_cli):
    write_measurements(tmp_path / "run" / "measure", tiny_llama, world_size=2)
    result = run_cli("quantize", "--run-dir", tmp_path / "run", "--low-cpu-mem", "--scale-method", "maxabs_pow2")
    assert result.exit_code == 0, result.stderr
    assert "28 FP8 tensors" in result.stdout and "vllm serve" in result.stdout
    assert "--kv-cache-dtype fp8" in result.stdout  # the meta says K/V were measured: their scales are written
    result = run_cli("quantize", "--run-dir", tmp_path / "run", "--low-cpu-mem", "--scale-method", "maxabs_pow2")
    assert "0 shard(s) written, 2 already done" in result.stdout  # the weights' shard and the k/v scales' one
    result = run_cli("quantize", "--run-dir", tmp_path / "run", "--scale-method", "maxabs_hw")
    assert result.exit_code == 2 and "Gaudi HW scales" in result.stderr and "Traceback" not in result.stderr


def test_gaudi_writes_inc_quant_config_and_keeps_weights(tmp_path, tiny_llama, run_cli):
    meas = tmp_path / "run" / "unified-tp8"
    write_measurements(meas, tiny_llama, world_size=1, device_type="gaudi2")
    result = run_cli("quantize", "--run-dir", tmp_path / "run", "--fp8-kv")
    assert result.exit_code == 0, result.stderr
    config = json.loads((tmp_path / "run/configs/inc_quant_with_fp8kv_one_node_config.json").read_text())
    assert config["mode"] == "QUANTIZE" and config["scale_method"] == "maxabs_hw"
    assert config["dump_stats_path"] == str(meas / "inc_measure_output")
    hint = next(line for line in result.stdout.splitlines() if "vllm serve" in line)
    assert f"QUANT_CONFIG={tmp_path / 'run/configs/inc_quant_with_fp8kv_one_node_config.json'}" in hint
    assert "PT_HPU_WEIGHT_SHARING=0" in hint and "--quantization inc" in hint and "--kv-cache-dtype fp8_inc" in hint
    assert "--trust-remote-code" in hint and "VLLM_HPU_FORCE_CHANNEL_FP8" not in hint
    assert not (tmp_path / "run" / "fp8").exists()


def test_gaudi_serve_hint_follows_the_checkpoint_route(tmp_path, tiny_llama, run_cli):
    """An FP8 (block) checkpoint is served without --quantization (vLLM refuses inc against its fp8) and with
    VLLM_HPU_FORCE_CHANNEL_FP8=0; TP and EP come from the measurements' meta; --fp8-kv needs K/V ranges."""
    from ray_calib.inc import read_meta, write_meta

    fp8_model = tmp_path / "fp8-model"
    fp8_model.mkdir()
    config = json.loads((tiny_llama / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (fp8_model / "config.json").write_text(json.dumps(config))
    meas = tmp_path / "run" / "unified-tp8"
    write_measurements(meas, tiny_llama, world_size=1, device_type="gaudi2")
    meta = read_meta(meas)
    write_meta(meas, dataclasses.replace(meta, tp_size=8, ep_size=8, model=str(fp8_model), fp8_kv=False))
    result = run_cli("quantize", "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    hint = next(line for line in result.stdout.splitlines() if "vllm serve" in line)
    assert "--quantization" not in hint and "VLLM_HPU_FORCE_CHANNEL_FP8=0" in hint
    assert "--tensor-parallel-size 8 --enable-expert-parallel" in hint and "PT_HPU_ENABLE_LAZY_COLLECTIVES=true" in hint
    refused = run_cli("quantize", "--run-dir", tmp_path / "run", "--fp8-kv")
    assert refused.exit_code == 2 and "recorded no K/V ranges" in refused.stderr


def test_read_ahead_and_low_cpu_mem_write_identical_shards(tmp_path, tiny_llama):
    streamed = run_quantize(tmp_path, tiny_llama, scale_method="maxabs_arbitrary", low_cpu_mem=True)
    ahead = run_quantize(tmp_path, tiny_llama, scale_method="maxabs_arbitrary", out=tmp_path / "ahead")
    for shard in Checkpoint.open(tiny_llama).shards:
        assert file_sha256(streamed.summary.out / shard) == file_sha256(ahead.summary.out / shard)


def test_low_cpu_mem_copies_tensors_larger_than_its_buffers_in_blocks(tmp_path, tiny_llama, monkeypatch):
    """The embeddings and lm_head (512 KB) exceed the largest quantized weight (256 KB): with 100 kB blocks
    they are copied in 6 uneven pieces, and the shard is byte for byte the default mode's."""
    from ray_calib.convert import cast, quantize

    blocks = []
    real_chunks = cast.chunks

    def small_chunks(reader, name, buffer_bytes=cast.CHUNK_BYTES):
        for block in real_chunks(reader, name, 100_000):
            blocks.append((name, block.nbytes))
            yield block

    monkeypatch.setattr(quantize, "chunks", small_chunks)
    streamed = run_quantize(tmp_path, tiny_llama, scale_method="maxabs_arbitrary", low_cpu_mem=True)
    ahead = run_quantize(tmp_path, tiny_llama, scale_method="maxabs_arbitrary", out=tmp_path / "ahead")
    assert sorted({name for name, _ in blocks}) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert [size for name, size in blocks if name == "lm_head.weight"] == [100_000] * 5 + [24_288]
    for shard in Checkpoint.open(tiny_llama).shards:
        assert file_sha256(streamed.summary.out / shard) == file_sha256(ahead.summary.out / shard)


def test_opt_weight_method_picks_a_candidate_scale(tmp_path, tiny_llama):
    result = run_quantize(tmp_path, tiny_llama, scale_method="maxabs_pow2_opt_weight", low_cpu_mem=True)
    fp8 = tensors(result.summary.out)
    scale = float(fp8["model.layers.0.mlp.down_proj.weight_scale"])
    assert scale in [2.0**s for s in range(-10, 10)]


def test_nan_weight_is_refused_before_writing(tmp_path, tiny_llama):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "nan-model"
    shutil.copytree(tiny_llama, model)
    shard = next(model.glob("*.safetensors"))
    weights = load_file(shard)
    name = next(n for n in weights if n.endswith("o_proj.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, shard, metadata={"format": "pt"})
    with pytest.raises(ModelError, match=f"'{name}' holds inf/NaN"):
        run_quantize(tmp_path, model, scale_method="maxabs_pow2")
    assert not list((tmp_path / "run" / "fp8").glob("*.safetensors"))


def test_broken_config_truncated_shard_and_bad_header_are_one_line_errors(tmp_path, tiny_llama):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json: not valid JSON"):
        Checkpoint.open(broken)
    (broken / "config.json").write_text((tiny_llama / "config.json").read_text())
    shard = next(broken.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(ModelError, match="truncated .* re-download"):
        Checkpoint.open(broken)
    header = b"[1, 2, 3]"
    shard.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ModelError, match="not a safetensors file \\(bad header"):
        Checkpoint.open(broken)


def test_a_unified_dir_older_than_the_measurement_is_refused(tmp_path, tiny_llama, run_cli):
    """Re-measure without re-unify: quantize must not take the old ranges of unified-tp1 silently."""
    from ray_calib.inc.meta import read_meta, write_meta

    run = tmp_path / "run"
    write_measurements(run / "measure", tiny_llama, world_size=2, seed=1)
    write_measurements(run / "unified-tp1", tiny_llama, world_size=1, seed=0)
    old = read_meta(run / "unified-tp1")
    write_meta(run / "unified-tp1", dataclasses.replace(old, num_tokens=100, dataset_hash="old", unified_from=2))
    new = read_meta(run / "measure")
    write_meta(run / "measure", dataclasses.replace(new, num_tokens=200, dataset_hash="new"))
    result = run_cli("quantize", "--run-dir", run, "--scale-method", "maxabs_pow2")
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    assert "unified-tp1" in result.stderr and "dataset_hash" in result.stderr and "unify" in result.stderr
    assert not (run / "fp8").exists()
    # the same source (unify copies the measurement's meta): the unified dir is used
    write_meta(run / "unified-tp1", dataclasses.replace(read_meta(run / "measure"), tp_size=1, unified_from=2))
    result = quantize_run(QuantizeRequest(run=RunDir.resolve(run), scale_method="maxabs_pow2"))
    assert result.measurements == run / "unified-tp1"


def test_measurements_without_a_meta_need_an_explicit_device(tmp_path, tiny_llama):
    """Plain INC output (no sidecar) may come from Gaudi: quantize does not guess `cpu`."""
    meas = tmp_path / "run" / "measure"
    write_measurements(meas, tiny_llama, world_size=2)
    (meas / "ray_calib_meta.json").unlink()
    with pytest.raises(ConfigError, match="says which device measured") as err:
        run_quantize(tmp_path, tiny_llama, scale_method="maxabs_pow2")
    assert "--device" in (err.value.fix or "") and not (tmp_path / "run" / "fp8").exists()
    assert run_quantize(tmp_path, tiny_llama, scale_method="maxabs_pow2", device="cpu").device == "cpu"


@pytest.mark.parametrize("inc_version,key", [(None, "scale_method"), ("3.4", "scale_params")])
def test_gaudi_backoffs_go_where_the_target_inc_reads_them(tmp_path, tiny_llama, run_cli, inc_version, key):
    """INC <= 3.4 reads scale_params; 3.5+ ignores it and reads backoffs only from a dict-form scale_method."""
    write_measurements(tmp_path / "run" / "unified-tp8", tiny_llama, world_size=1, device_type="gaudi2")
    version = ["--inc-version", inc_version] if inc_version else []
    result = run_cli("quantize", "--run-dir", tmp_path / "run", "--input-backoff", "0.5", *version)
    assert result.exit_code == 0, result.stderr
    config = json.loads((tmp_path / "run/configs/inc_quant_with_fp8kv_one_node_config.json").read_text())
    if key == "scale_params":
        assert config["scale_method"] == "maxabs_hw" and config["scale_params"] == {"input_backoff": 0.5}
    else:
        assert "scale_params" not in config
        assert config["scale_method"]["default"]["activation"] == {
            "granularity": "pts",
            "scale_value_type": "maxabs",
            "rounding_method": "hw_aligned",
            "backoff": 0.5,
        }
        assert config["scale_method"]["default"]["weight"]["backoff"] == 0.5  # maxabs_hw's own


def test_weight_strategy_channel_writes_one_scale_per_output_row(tmp_path, tiny_llama, run_cli):
    """CPU/CUDA default scales with --weight-strategy channel: weight_scale [out, 1] = row max-abs / 448,
    input scales stay per tensor, and the compressed-tensors config says so (what vLLM dispatches on)."""
    write_measurements(tmp_path / "run" / "measure", tiny_llama, world_size=2)
    result = run_cli("quantize", "--run-dir", tmp_path / "run", "--weight-strategy", "channel", "--fp8-kv")
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "run" / "fp8"
    fp8, bf16 = tensors(out), tensors(tiny_llama)
    quantized = [n for n, t in fp8.items() if t.dtype == torch.float8_e4m3fn]
    assert len(quantized) == 4 * 7
    for name in quantized:
        scale, reference = fp8[name.replace(".weight", ".weight_scale")], bf16[name].float()
        assert scale.dtype == torch.float32 and scale.shape == (reference.shape[0], 1), name
        assert torch.equal(scale, reference.abs().amax(dim=1, keepdim=True) / 448.0), name
        restored = fp8[name].float() * scale
        assert bool(((restored - reference).abs() <= reference.abs() / 16 + scale * 2.0**-9).all()), name
        assert fp8[name.replace(".weight", ".input_scale")].shape == (1,)
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel"
    assert group["input_activations"]["strategy"] == "tensor" and group["input_activations"]["dynamic"] is False
    tensor = run_cli("quantize", "--run-dir", tmp_path / "run", "--weight-strategy", "tensor", "--out", tmp_path / "t")
    assert tensor.exit_code == 0, tensor.stderr
    assert tensors(tmp_path / "t")["model.layers.0.mlp.down_proj.weight_scale"].shape == (1,)
    config = json.loads((tmp_path / "t" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["strategy"] == "tensor"


def test_weight_strategy_is_refused_with_an_inc_scale_method(tmp_path, tiny_llama, run_cli):
    write_measurements(tmp_path / "run" / "measure", tiny_llama, world_size=2)
    result = run_cli(
        "quantize", "--run-dir", tmp_path / "run", "--scale-method", "maxabs_pow2", "--weight-strategy", "channel"
    )
    assert result.exit_code == 2 and "--weight-strategy" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "fp8").exists()


def test_kv_scales_set_to_one_keep_the_checkpoint_verifiable(tmp_path, tiny_llama):
    """The k/v choice's "scale 1.0" rewrites only the k/v shard, to exactly 1.0; a rerun of quantize verifies
    every other shard and writes the measured k/v scales again."""
    from ray_calib.convert.quantize import KV_SHARD, set_kv_scales

    result = run_quantize(tmp_path, tiny_llama, scale_method="maxabs_pow2", fp8_kv=True)
    out = result.summary.out
    before = {name: float(t) for name, t in tensors(out).items() if name.endswith(("k_scale", "v_scale"))}
    assert before and all(value != 1.0 for value in before.values())
    others = {s: file_sha256(out / s) for s in Checkpoint.open(out).shards if s != KV_SHARD}
    assert set_kv_scales(out, 1.0) == len(before)
    after = {name: float(t) for name, t in tensors(out).items() if name.endswith(("k_scale", "v_scale"))}
    assert after == dict.fromkeys(before, 1.0)
    assert {s: file_sha256(out / s) for s in others} == others
    rerun = run_quantize(tmp_path, tiny_llama, scale_method="maxabs_pow2", fp8_kv=True)
    assert rerun.summary.shards_written == [KV_SHARD] and set(rerun.summary.shards_skipped) == set(others)
    assert {name: float(t) for name, t in tensors(out).items() if name in before} == before
    plain = run_quantize(tmp_path / "plain", tiny_llama, scale_method="maxabs_pow2", fp8_kv=False)
    assert set_kv_scales(plain.summary.out, 1.0) == 0
