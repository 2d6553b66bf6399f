"""`quantize --device gaudi2|gaudi3 --format compressed-tensors`: the checkpoint vllm-gaudi's loader takes as is.

Every rule checked here is read from the reference loader's source (tests/convert/gaudi_loader.py): the
parameter names, dtypes and shapes it creates, the config key that turns off Gaudi2's scale adjustment,
which scales it collapses to their max, the FP8 maximum it reads k/v scales against and how it maps
k/v scale names onto its attention modules. The same checkpoints then load and generate in vLLM on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import fixture_dir
from tests.convert import gaudi_loader as ref

torch = pytest.importorskip("torch")

from ray_calib.convert.pipeline import QuantizeRequest, quantize_run  # noqa: E402
from ray_calib.convert.plan import kv_ranges, load_measurement  # noqa: E402
from ray_calib.errors import ConfigError  # noqa: E402
from ray_calib.inc.devices import get_device  # noqa: E402
from ray_calib.inc.methods import leaf_max  # noqa: E402
from ray_calib.infer.audit import carried_scales  # noqa: E402
from ray_calib.model import names  # noqa: E402
from ray_calib.rundir import RunDir  # noqa: E402
from tests.convert.synthetic import write_measurements  # noqa: E402
from tests.convert.test_quantize import tensors  # noqa: E402

INPUT_BACKOFF = 0.25  # maxabs_hw's activation backoff (INC's default)


@pytest.fixture(autouse=True)
def _reference():
    fixture_dir(ref.LOADER.parent)


def gaudi_checkpoint(tmp_path: Path, model: Path, device: str = "gaudi2", **options):
    run = tmp_path / "run"
    if not (run / "measure").exists():
        write_measurements(run / "measure", model, world_size=2, device_type=device)
    result = quantize_run(
        QuantizeRequest(
            run=RunDir.resolve(run), model=model, device=device, format="compressed-tensors", fp8_kv=True, **options
        )
    )
    return result, load_measurement(run / "measure")[0].nodes


def attention_params(config: dict) -> set[str]:
    """vllm-gaudi's k/v scale parameters: `self_attn.attn.*` (dense), `self_attn.mla_attn.mla_attn.*` (MLA)."""
    attn = "mla_attn.mla_attn" if "kv_lora_rank" in config else "attn"
    return {
        f"model.layers.{i}.self_attn.{attn}.{kind}_scale"
        for i in range(config["num_hidden_layers"])
        for kind in ("k", "v")
    }


@pytest.mark.parametrize("model_fixture", ["tiny_deepseek", "smollm2"])
def test_gaudi2_checkpoint_field_by_field_against_the_reference_loader(tmp_path, request, model_fixture):
    model = request.getfixturevalue(model_fixture)
    result, nodes = gaudi_checkpoint(tmp_path, model)
    out = result.summary.out
    assert out == tmp_path / "run" / "fp8-gaudi2" and result.method == "maxabs_hw"
    gaudi2 = get_device("gaudi2")
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]

    # config: the key from_config reads to skip the 448 -> 240 adjustment, and a static per-tensor W8A8 scheme
    key, value = ref.flavor_rule()
    assert ref.from_config_reads_flavor() and qc[key] == value == "float8_e4m3fnuz"
    group = qc["config_groups"]["group_0"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    assert group["weights"]["strategy"] == "tensor" and group["weights"]["type"] == "float"
    assert group["input_activations"]["strategy"] == "tensor" and group["input_activations"]["dynamic"] is False
    assert qc["kv_cache_scheme"] is not None

    # every linear weight: the names, dtypes and shapes create_weights allocates for them
    params = ref.linear_params("TENSOR")
    assert set(params) == {"weight", "weight_scale", "input_scale"}
    fp8 = tensors(out)
    weights = [n for n, t in fp8.items() if t.dtype == torch.float8_e4m3fn]
    assert weights
    for name in weights:
        prefix = name.removesuffix(".weight")
        rows, cols = fp8[name].shape
        for param, spec in params.items():
            tensor = fp8[f"{prefix}.{param}" if param != "weight" else name]
            assert str(tensor.dtype).removeprefix("torch.") == spec.dtype, (name, param)
            assert tuple(tensor.shape) == ref.shape(spec, rows, cols), (name, param)
        # Gaudi2's E4M3 (fnuz) ends at 240; every scale is one of its four HW scales (INC's maxabs_hw)
        assert fp8[name].float().abs().max() <= gaudi2.fullscale, name
        for scale in (fp8[f"{prefix}.weight_scale"], fp8[f"{prefix}.input_scale"]):
            assert float(scale) in gaudi2.hw_scales, (name, float(scale))
    # the loader HW-aligns input scales (already aligned: unchanged) and keeps the max of a fused layer's
    assert ref.hw_aligns_input_scale() and ref.reduced_to_max("HPUCompressedTensorsW8A8Fp8") == {"input_scale"}
    layer = "model.layers.0.self_attn"
    if "kv_lora_rank" not in config:
        assert fp8[f"{layer}.q_proj.input_scale"] == fp8[f"{layer}.k_proj.input_scale"]
    for name in weights:
        if name.endswith("gate_proj.weight"):
            up = name.replace("gate_proj", "up_proj")
            assert fp8[name.replace(".weight", ".input_scale")] == fp8[up.replace(".weight", ".input_scale")]

    # MoE: the loader keeps only the max of the per-expert gate/up input scales; it covers every expert
    moe = ref.reduced_to_max("HPUCompressedTensorsW8A8Fp8MoEMethod")
    assert moe == {"w13_input_scale"}
    experts = [n for n in weights if ".experts." in n and n.endswith("gate_proj.weight")]
    assert bool(experts) == ("n_routed_experts" in config)
    by_layer: dict[str, list[str]] = {}
    for name in experts:
        by_layer.setdefault(name.split(".experts.")[0], []).append(name)
    for layer_prefix, members in by_layer.items():
        kept = max(float(fp8[n.replace(".weight", ".input_scale")]) for n in members)
        ranges = [
            leaf_max(nodes[f"{layer_prefix}.experts.w13_list.{n.split('.experts.')[1].split('.')[0]}"]["inputs"])
            for n in members
        ]
        assert all(r <= kept * gaudi2.fullscale * INPUT_BACKOFF for r in ranges), layer_prefix

    # k/v (MLA: latent) scales: names vllm-gaudi maps onto its attention modules, read against 240
    remap = ref.remap_kv_scale_name()
    expected = attention_params(config)
    kv = [n for n in fp8 if n.endswith(("k_scale", "v_scale"))]
    assert {remap(n, dict.fromkeys(expected)) for n in kv} == expected
    _, without_adjustment = ref.kv_full_scales()
    assert without_adjustment == gaudi2.fullscale  # the flavor key turns the adjustment off on Gaudi2
    for layer_name, (k_range, v_range) in kv_ranges(nodes).items():
        k_name, v_name = names.kv_scale_names(layer_name)
        assert float(fp8[k_name]) * without_adjustment >= k_range and float(fp8[v_name]) * without_adjustment >= v_range
        if "kv_lora_rank" in config:  # one latent cache: the loader takes max(k, v); ours are already equal
            assert ref.mla_kv_takes_max() and fp8[k_name] == fp8[v_name]


def test_gaudi3_checkpoint_uses_the_448_range_and_no_flavor(tmp_path, tiny_deepseek):
    result, _ = gaudi_checkpoint(tmp_path, tiny_deepseek, device="gaudi3")
    out = result.summary.out
    assert out == tmp_path / "run" / "fp8-gaudi3"
    key, _ = ref.flavor_rule()
    assert key not in json.loads((out / "config.json").read_text())["quantization_config"]
    fp8 = tensors(out)
    gaudi3 = get_device("gaudi3")
    scales = [float(t) for n, t in fp8.items() if n.endswith(("weight_scale", "input_scale"))]
    assert scales and all(s in gaudi3.hw_scales for s in scales)
    assert any(s not in get_device("gaudi2").hw_scales for s in scales)  # Gaudi3's finer table is used
    peak = max(float(t.float().abs().max()) for t in fp8.values() if t.dtype == torch.float8_e4m3fn)
    assert 0 < peak <= gaudi3.fullscale


def test_one_run_writes_both_checkpoints_and_says_which_is_which(tmp_path, tiny_deepseek, run_cli):
    write_measurements(tmp_path / "run" / "measure", tiny_deepseek, world_size=2, device_type="gaudi2")
    result = run_cli(
        "quantize", "--run-dir", tmp_path / "run", "--format", "compressed-tensors", "--also-cuda", "--fp8-kv"
    )
    assert result.exit_code == 0, result.stderr
    assert f"wrote {tmp_path / 'run' / 'fp8-gaudi2'}" in result.stdout and "(for vllm-gaudi gaudi2)" in result.stdout
    assert f"wrote {tmp_path / 'run' / 'fp8'}:" in result.stdout and "(for CPU/CUDA)" in result.stdout
    assert "serve on Gaudi: vllm serve" in result.stdout and "--kv-cache-dtype fp8_inc" in result.stdout
    cuda = json.loads((tmp_path / "run" / "fp8" / "config.json").read_text())["quantization_config"]
    assert "fp8_dtype_flavor" not in cuda
    # MoE input scales: vLLM keeps one per layer and projection (so that is what the CPU/CUDA checkpoint
    # holds); vllm-gaudi keeps down-projection ones per expert (so the Gaudi checkpoint keeps each expert's)
    distinct = {
        name: [
            len(set(values.values()))
            for kinds in carried_scales(run).expert_inputs.values()
            for values in kinds.values()
        ]
        for name, run in (("cuda", tmp_path / "run" / "fp8"), ("gaudi", tmp_path / "run" / "fp8-gaudi2"))
    }
    assert distinct["cuda"] and set(distinct["cuda"]) == {1} and max(distinct["gaudi"]) > 1, distinct


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"device": "cpu", "format": "inc"}, "INC's QUANT_CONFIG route is for Gaudi"),
        ({"device": "gaudi2", "also_cuda": True}, "--also-cuda"),
        ({"device": "gaudi2", "low_cpu_mem": True}, "--low-cpu-mem"),
    ],
)
def test_format_mixes_that_cannot_work_are_refused_before_writing(tmp_path, tiny_llama, options, words):
    write_measurements(tmp_path / "run" / "measure", tiny_llama, world_size=1)
    with pytest.raises(ConfigError, match=words):
        quantize_run(QuantizeRequest(run=RunDir.resolve(tmp_path / "run"), model=tiny_llama, **options))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["measure"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_fixture", ["tiny_deepseek", pytest.param("smollm2", marks=pytest.mark.extended)]
)  # MLA + MoE in make test; the dense real model in the extended tier
def test_gaudi2_checkpoint_loads_and_generates_in_vllm_cpu(tmp_path, request, model_fixture):
    """Stock vLLM reads the same compressed-tensors fields (it ignores fp8_dtype_flavor): it loads and generates."""
    from tests.convert.test_vllm_load import generate

    result, _ = gaudi_checkpoint(tmp_path, request.getfixturevalue(model_fixture))
    run = generate(result.summary.out)
    assert run.quantization == "compressed-tensors" and len(run.tokens) == 6
