"""Real `ray-calib measure` runs of tiny Llama and tiny DeepSeek-V3 on vLLM/CPU at TP=1, 2 and 4.

DeepSeek runs on every MLA backend this CPU has (CPU_MLA; AMX_MLA where the CPU has AMX tiles).
"""

from __future__ import annotations

import json
import re

import pytest

from ray_calib.inc import MeasurementSet, read_coverage, read_meta
from tests.measure.conftest import ARCH_BACKENDS, MLA_BACKENDS

pytestmark = pytest.mark.slow

LAYERS = 4
TOP_K = 2


def ranks(run):
    return MeasurementSet.discover(run.out).read_all()


def with_backends(cases):
    """(arch, tp, fp8_kv) cases -> (arch, tp, fp8_kv, backend) params, DeepSeek once per MLA backend.
    TP=4 repeats what TP=2 shows with more ranks: it is in the extended tier."""
    params = []
    for arch, tp, fp8_kv in cases:
        tier = [pytest.mark.extended] if tp == 4 else []
        if arch != "deepseek_v3":
            params.append(pytest.param(arch, tp, fp8_kv, None, marks=tier, id=f"{arch}-tp{tp}"))
            continue
        for backend in MLA_BACKENDS:
            backend_name = backend.values[0]
            marks = [*backend.marks, *tier]
            params.append(pytest.param(arch, tp, fp8_kv, backend_name, marks=marks, id=f"{arch}-tp{tp}-{backend_name}"))
    return params


@pytest.mark.parametrize(
    "arch,tp,fp8_kv,backend",
    with_backends(
        [
            ("llama", 1, False),
            ("llama", 2, True),
            ("llama", 4, True),
            ("deepseek_v3", 1, False),
            ("deepseek_v3", 2, True),
            ("deepseek_v3", 4, True),
        ]
    ),
)
def test_one_file_per_rank_with_meta(measured, arch, tp, fp8_kv, backend):
    run = measured(arch, tp, fp8_kv, backend)
    files = ranks(run)
    assert [f.rank for f in files] == list(range(tp)) and {f.name.world_size for f in files} == {tp}
    assert all(f.nodes.keys() == files[0].nodes.keys() for f in files)
    meta = read_meta(run.out)
    assert (meta.tp_size, meta.ep_size, meta.observer, meta.fp8_kv, meta.device_type) == (
        tp,
        1,
        "maxabs",
        fp8_kv,
        "cpu",
    )
    assert meta.num_samples == 8 and meta.chunks_done == [0, 1, 2, 3] and meta.chunks_total == 4
    assert len(meta.dataset_hash) == 64 and meta.num_tokens == 8 * 24 + 0  # prefill only: 24 tokens per prompt
    assert not (run.out / ".chunks").exists()
    assert meta.extra["backends"]["attention"] == [backend or "CPU_ATTN"], "the backend asked for is the one that ran"
    assert f"observed under vLLM attention backend {backend or 'CPU_ATTN'}" in run.stdout
    for f in files:
        assert set(f.mod_list) >= set(f.nodes)
        for module, node in f.nodes.items():
            assert "lm_head" not in module and not re.search(r"mlp\.gate\b", module)
            if "weight" in node.get("params", {}):
                assert node["params"]["weight"][0][0] > 0, module  # read before the CPU repack emptied it
            if (
                not module.endswith((".w13_list", ".w2_list"))
                and ".w13_list." not in module
                and ".w2_list." not in module
            ):
                assert node["inputs"][0][0][0] > 0, module


def test_row_parallel_layers_have_pre_and_post_reduce_outputs(measured):
    files = ranks(measured("llama", 2, True))
    for layer in range(LAYERS):
        for name in (f"model.layers.{layer}.self_attn.o_proj", f"model.layers.{layer}.mlp.down_proj"):
            outputs = [f.nodes[name]["outputs"] for f in files]
            assert all(len(o) == 2 for o in outputs)
            assert outputs[0][1] == outputs[1][1], "post-reduce output is replicated"
        qkv = f"model.layers.{layer}.self_attn.qkv_proj"
        assert "outputs" not in files[0].nodes[qkv]
        assert files[0].nodes[qkv]["inputs"] == files[1].nodes[qkv]["inputs"], "column-parallel input is replicated"


def test_fp8_kv_adds_kv_nodes_and_bf16_kv_does_not(measured):
    def kv_nodes(run):
        return sorted(n for n in ranks(run)[0].nodes if "_cache" in n)

    llama = [f"model.layers.{i}.self_attn.attn.impl.{kv}" for i in range(LAYERS) for kv in ("k_cache", "v_cache")]
    assert kv_nodes(measured("llama", 2, True)) == sorted(llama)
    assert kv_nodes(measured("llama", 1, False)) == []
    mla = [f"model.layers.{i}.self_attn.mla_attn.mla_attn.impl.latent_cache_k" for i in range(LAYERS)]
    assert kv_nodes(measured("deepseek_v3", 2, True)) == sorted(mla)
    assert kv_nodes(measured("deepseek_v3", 1, False)) == []


def test_moe_nodes_and_coverage(measured):
    run = measured("deepseek_v3", 2, True)
    files = ranks(run)
    coverage = read_coverage(run.out)
    experts = 8
    moe_layers = [f"model.layers.{i}.mlp.experts" for i in range(1, LAYERS)]  # layer 0 is dense
    assert sorted(coverage.experts) == moe_layers
    for op in moe_layers:
        counts = coverage.experts[op]
        assert len(counts) == experts and sum(counts) == coverage.num_tokens * TOP_K
        node = files[0].nodes[op]
        assert len(node["inputs"]) == 1 and len(node["outputs"]) == 1 + experts
        for k in range(experts):
            w13, w2 = files[0].nodes[f"{op}.w13_list.{k}"], files[0].nodes[f"{op}.w2_list.{k}"]
            assert w13["params"]["weight"][0][0] > 0 and w2["params"]["weight"][0][0] > 0
            hit = counts[k] > 0
            assert (w13["inputs"][0][0][0] > 0) == hit and (w2["inputs"][0][0][0] > 0) == hit
            assert w2["inputs"][0] == node["outputs"][1 + k], "w2 input is the expert's intermediate"
            assert w13["inputs"][0][0][0] <= node["inputs"][0][0][0], "an expert sees a subset of the tokens"
        # plain TP shards every expert: both ranks hold all experts with different weight shards
        assert files[1].nodes[f"{op}.w13_list.0"]["params"] != files[0].nodes[f"{op}.w13_list.0"]["params"]
    meta = read_meta(run.out)
    assert meta.extra["expert_tokens"] == coverage.experts
    assert json.loads((run.out / "coverage.json").read_text())["never_hit"] == coverage.never_hit()


def test_node_names_follow_inc_for_llama(measured):
    """Our Llama nodes are named and shaped like INC's (Llama-70B fixture): unify/scales treat them alike."""
    from ray_calib.inc import read_rank_file
    from ray_calib.inc.naming import parse_name
    from tests.conftest import LLAMA70B_TP4, fixture_dir

    directory = fixture_dir(LLAMA70B_TP4)
    inc = read_rank_file(directory, parse_name(directory / "inc_output_hooks_maxabs_0_4.json")[0], check_npz=False)
    ours = ranks(measured("llama", 2, True))[0]
    for name, node in ours.nodes.items():
        assert name in inc.nodes, f"{name} has no INC counterpart"
        assert {k: len(v) for k, v in node.items()} == {k: len(v) for k, v in inc.nodes[name].items()}, name


@pytest.mark.parametrize("arch,backend", ARCH_BACKENDS)
def test_every_weight_quantize_converts_has_an_input_range(measured, tiny_models, arch, backend):
    """quantize's own matching rule finds nothing missing, on every backend; MLA's kv_b_proj holds the latent."""
    from ray_calib.measurements import unify_ranks
    from ray_calib.measurements.match import match_measurement
    from ray_calib.model.checkpoint import Checkpoint

    files = ranks(measured(arch, 2, True, backend))
    match = match_measurement(
        Checkpoint.open(tiny_models[arch]).tensors, unify_ranks(files, 1, expert_parallel=False)[0].nodes
    )
    assert match.complete, (match.missing[:3], match.unmeasured[:3])
    if arch != "deepseek_v3":
        return
    for f in files:
        for layer in range(LAYERS):
            kv_b = f.nodes[f"model.layers.{layer}.self_attn.kv_b_proj"]
            latent = f.nodes[f"model.layers.{layer}.self_attn.mla_attn.mla_attn.impl.latent_cache_k"]
            assert kv_b["params"]["weight"][0][0] > 0 and kv_b["inputs"][0][0][0] > 0
            # the cache row is [kv_c_normed | k_pe]; kv_b_proj reads kv_c_normed alone
            assert kv_b["inputs"][0][0][0] <= latent["inputs"][0][0][0]
        assert (
            f.nodes["model.layers.1.self_attn.kv_b_proj"]["inputs"]
            == files[0].nodes["model.layers.1.self_attn.kv_b_proj"]["inputs"]
        ), "the latent is replicated on every rank"


def test_a_missing_range_fails_measure_naming_module_and_backend(measured, tiny_models):
    """What AMX_MLA did before the latent capture: no kv_b_proj node. measure's own check names it in one line."""
    from dataclasses import replace

    from ray_calib.errors import ModelError
    from ray_calib.measure.quantizable import check_quantizable

    files = ranks(measured("deepseek_v3", 2, True))
    gone = "model.layers.2.self_attn.kv_b_proj"
    broken = [replace(f, nodes={n: v for n, v in f.nodes.items() if n != gone}) for f in files]
    with pytest.raises(ModelError) as err:
        check_quantizable(
            tiny_models["deepseek_v3"], broken, {"attention": ["AMX_MLA"], "moe": ["CPUUnquantizedExperts"]}
        )
    message = str(err.value)
    assert "\n" not in message
    assert f"{gone} has no input range" in message and "vLLM attention backend AMX_MLA" in message
    assert f"quantize converts {gone}.weight" in message and "--attention-backend" in message
    check_quantizable(tiny_models["deepseek_v3"], files, {})  # the run as measured is complete
