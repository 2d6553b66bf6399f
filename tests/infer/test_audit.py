"""The scale audit's comparison (pure): the checkpoint's scales, as `quantize` writes them, against engine
read-backs shaped like vLLM 0.32's; then a real server read back over /collective_rpc (the FP8-KV chain in
tests/measure reads a real offline engine)."""

from __future__ import annotations

import copy
import os
import re
import signal

import pytest

from ray_calib.convert.pipeline import QuantizeRequest, quantize_run
from ray_calib.errors import EngineError
from ray_calib.infer.audit import ScaleAudit, audit, carried_scales, check
from ray_calib.model.names import vllm_modules
from ray_calib.rundir import RunDir
from tests.convert.synthetic import write_measurements

BACKEND = "CPUAttentionBackendImpl"


@pytest.fixture(scope="module")
def carried(tiny_model, tmp_path_factory):
    model = tiny_model("llama")
    run = RunDir(tmp_path_factory.mktemp("audit") / "run")
    write_measurements(run.measure, model, world_size=1)
    quantize_run(QuantizeRequest(run=run, scale_method="maxabs_pow2", fp8_kv=True))
    return carried_scales(run.fp8)


def engine(carried, *, kv_cache_dtype: str = "fp8") -> list[dict]:
    """What `ScaleAuditExtension` reports for an engine that uses every scale (one rank)."""
    modules = {vllm_modules(name)[0]: {"weight": True, "input": True} for name in carried.linear}
    for prefix, values in carried.kv.items():
        modules[f"{prefix}.attn"] = {"kv": dict(values), "kv_cache_dtype": kv_cache_dtype, "backend": BACKEND}
    return [{"rank": 0, "modules": modules}]


def test_every_scale_in_use_is_counted(carried):
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"} <= set(carried.linear)
    assert set(carried.kv) == {f"model.layers.{i}.self_attn" for i in range(4)}
    result = audit(carried, engine(carried))
    assert result.dropped == [] and result.backends == [BACKEND]
    assert result.counts["kv"] == {"carried": 4, "in_use": 4}
    assert result.counts["weight"]["carried"] == result.counts["weight"]["in_use"] == len(carried.linear)
    check(result, allow_scale_loss=False)
    assert ScaleAudit.from_json(result.to_json()) == result


def test_a_kv_scale_replaced_by_one_fails_naming_the_layer_and_backend(carried):
    ranks = engine(carried)
    ranks[0]["modules"]["model.layers.2.self_attn.attn"]["kv"]["k"] = 1.0
    result = audit(carried, ranks)
    assert result.counts["kv"] == {"carried": 4, "in_use": 3}
    (line,) = result.dropped
    assert line.startswith("model.layers.2.self_attn: k scale") and "(replaced by 1.0)" in line and BACKEND in line
    with pytest.raises(EngineError, match="1 calibrated scale.*model.layers.2.self_attn.*--allow-scale-loss"):
        check(result, allow_scale_loss=False)
    check(result, allow_scale_loss=True)


def test_a_rank_without_a_weight_scale_or_attention_layer_is_a_drop(carried):
    two = engine(carried) + copy.deepcopy(engine(carried))
    two[1]["rank"] = 1
    del two[1]["modules"]["model.layers.0.self_attn.qkv_proj"]["weight"]
    del two[1]["modules"]["model.layers.3.self_attn.attn"]
    result = audit(carried, two)
    assert any(d.startswith("model.layers.0.self_attn.q_proj: its weight scale") for d in result.dropped)
    assert any(d.startswith("model.layers.3.self_attn: k/v scales carried") for d in result.dropped)


def test_a_bf16_cache_uses_no_kv_scales_by_choice(carried):
    result = audit(carried, engine(carried, kv_cache_dtype="bfloat16"))
    assert result.dropped == [] and result.counts["kv"]["in_use"] == 0 and "--no-fp8-kv" in result.notes[0]


def test_per_expert_scales_collapsed_or_ignored_are_drops():
    from ray_calib.infer.audit import CarriedScales

    carried = CarriedScales(experts={"model.layers.1.mlp.experts": set(range(8))})
    held = {"model.layers.1.mlp.experts.routed_experts": {"weight": True, "expert_scales": 8}}
    assert audit(carried, [{"rank": 0, "modules": held}]).dropped == []
    ep = [{"rank": r, "modules": {"model.layers.1.mlp.experts.routed_experts": {"expert_scales": 4}}} for r in (0, 1)]
    assert audit(carried, ep).counts["experts"] == {"carried": 1, "in_use": 1}  # expert parallel: 4 + 4
    held["model.layers.1.mlp.experts.routed_experts"]["expert_scales"] = 1
    (line,) = audit(carried, [{"rank": 0, "modules": held}]).dropped
    assert "8 experts carry weight scales, the engine holds 1 per rank (collapsed" in line


@pytest.fixture
def fp8_llama(tiny_model, tmp_path):
    """The tiny Llama quantized with FP8 k/v scales from synthetic measurements (no engine needed to write it)."""
    run = RunDir(tmp_path / "run")
    write_measurements(run.measure, tiny_model("llama"), world_size=1)
    quantize_run(QuantizeRequest(run=run, scale_method="maxabs_pow2", fp8_kv=True))
    return run


@pytest.mark.slow
@pytest.mark.extended  # a second `vllm serve` start (make test serves the BF16 tiny Llama)
def test_serve_reads_the_scales_back_from_the_running_server(fp8_llama, run_cli, monkeypatch):
    """`infer --serve` audits the server it started, through vLLM's /collective_rpc (loopback only)."""
    from ray_calib.testing.localnodes import free_ports

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    port = free_ports(1)[0]
    args = ("infer", "--run-dir", fp8_llama.root, "--serve", "--detach", "--port", port, "--kv-cache-gib", 0.25)
    result = run_cli(*args, "--timeout", 600, "--enforce-eager")
    assert result.exit_code == 0, result.stderr
    pid = int(result.stdout.split("kill ")[-1].split()[0])
    try:
        assert "VLLM_SERVER_DEV_MODE=1" in result.stdout and "--worker-extension-cls" in result.stdout
        audit_line = re.search(r"scale audit: (\d+)/(\d+) weight, (\d+)/(\d+) input, 4/4 kv in use", result.stdout)
        assert audit_line and audit_line[1] == audit_line[2] and audit_line[3] == audit_line[4], result.stdout
    finally:
        os.killpg(pid, signal.SIGTERM)


def test_vllms_dev_endpoints_are_opened_for_the_audit_on_loopback_only(fp8_llama, tiny_model):
    from ray_calib.infer.runner import DEV_MODE_ENV, InferConfig, audits_served, serve_args, serve_env

    fp8 = InferConfig(model=fp8_llama.fp8, tp_size=1, device="cpu", fp8_kv=True)
    for host, audited in (("127.0.0.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False), ("h", False)):
        assert audits_served(fp8, host) is audited, host
        assert (DEV_MODE_ENV in serve_env(fp8, host)) is audited, host
        assert ("--worker-extension-cls" in serve_args(fp8, host=host, port=1)) is audited, host
    bf16 = InferConfig(model=tiny_model("llama"), tp_size=1, device="cpu", fp8_kv=False)
    assert not audits_served(bf16, "127.0.0.1") and DEV_MODE_ENV not in serve_env(bf16)


def _spread_expert_input_scales(checkpoint, layer: int) -> int:
    """Give the experts of one MoE layer their own gate/up input scales (halved for every other expert), as a
    writer that keeps per-expert values does. Returns how many experts the layer has."""
    from safetensors.torch import load_file, save_file

    pattern = re.compile(rf"^model\.layers\.{layer}\.mlp\.experts\.(\d+)\.(gate|up)_proj\.input_scale$")
    experts = set()
    for shard in checkpoint.glob("*.safetensors"):
        tensors = load_file(shard)
        hits = {name: int(m[1]) for name in tensors if (m := pattern.match(name))}
        for name, expert in hits.items():
            tensors[name] = tensors[name] * (0.5 if expert % 2 else 1.0)
            experts.add(expert)
        if hits:
            save_file(tensors, shard, metadata={"format": "pt"})
    assert len(experts) > 1, f"no per-expert input scales of layer {layer} in {checkpoint}"
    return len(experts)


@pytest.mark.slow
def test_per_expert_input_scales_the_real_engine_collapses_fail_the_audit(tiny_model, tmp_path, run_cli):
    """vLLM keeps one static input scale per MoE layer and projection (their max). Ours writes that max, so
    the audit is clean; a checkpoint with differing per-expert values loses them in the real engine."""
    deepseek = tiny_model("deepseek_v3")
    run = RunDir(tmp_path / "run")
    write_measurements(run.measure, deepseek, world_size=1)
    quantize_run(QuantizeRequest(run=run, scale_method="maxabs_pow2"))
    carried = carried_scales(run.fp8)
    assert carried.expert_inputs and all(
        len(set(values.values())) == 1 for kinds in carried.expert_inputs.values() for values in kinds.values()
    ), "quantize writes one input scale per MoE layer and projection"
    # our checkpoint's audit is clean in the real engine: the demo's tiny DeepSeek `infer` and `eval` show it
    moe_layer = int(next(iter(carried.expert_inputs)).split(".")[2])
    experts = _spread_expert_input_scales(run.fp8, moe_layer)
    # the engine core in its own process: an earlier in-process engine of this test worker (a dense model) would
    # leave vLLM's parallel state without the expert-parallel group this MoE model needs
    result = run_cli("infer", "--run-dir", run.root, "--max-new-tokens", 2, "--enforce-eager")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.exit_code != 0 and len(errors) == 1, result.stderr
    assert f"model.layers.{moe_layer}.mlp.experts: {experts} experts carry gate/up input scales from" in errors[0]
    assert "the engine keeps 1 per rank (collapsed to their max) (vLLM backend " in errors[0]
    assert "--allow-scale-loss" in errors[0]
