"""Step-3 post-processing of INC's Gaudi measurements, checked against the upstream script itself.

The upstream `step-3-postprocess-measure.py` (vllm-hpu-extension, from the shared reference directory beside the
checkout, docs/design.md §10) is run on a copy of the real INC files; our `postprocess` must produce the same
nodes. Skipped when that directory is absent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ray_calib.inc import MeasurementSet, RankFile, StatsName, read_rank_file, write_rank_file
from ray_calib.measurements.postprocess import postprocess
from tests.conftest import DS_R1_TP16, LLAMA70B_TP4, SHARED, fixture_dir

UPSTREAM = SHARED / "reference" / "vllm-hpu-extension" / "calibration" / "step-3-postprocess-measure.py"


def run_upstream(source: Path, rank: int, tmp_path: Path, deepseek: bool) -> tuple[RankFile, dict]:
    """Our rank file of `source` and upstream's fixed JSON of the same file."""
    if not UPSTREAM.is_file():
        pytest.skip(f"upstream script not found at {UPSTREAM}")
    measurement = MeasurementSet.discover(source)
    name = measurement.names[rank]
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    shutil.copy(name.file(source, ".json"), src)
    subprocess.run(
        [sys.executable, str(UPSTREAM), "-m", str(src), "-o", str(out)] + (["-d"] if deepseek else []),
        check=True,
        capture_output=True,
        timeout=300,
    )
    upstream = json.loads((out / name.file(source, ".json").name).read_text())
    return measurement.read(rank, check_npz=False), upstream


def test_deepseek_fixture_equals_upstream_step3(tmp_path):
    ours, upstream = run_upstream(fixture_dir(DS_R1_TP16), 5, tmp_path, deepseek=True)
    fixed, report = postprocess(ours)
    assert fixed.nodes == upstream["Nodes"]
    assert report.mla and report.attention_layers == 61
    assert report.matmul_inputs_fixed > 0  # the fixture's matmul_av reads a smaller range than the latent cache
    layer = "model.layers.3.self_attn.mla_attn.impl"
    assert fixed.nodes[f"{layer}.matmul_av"]["inputs"][1] == fixed.nodes[f"{layer}.latent_cache_k"]["inputs"][0]
    assert ours.nodes[f"{layer}.matmul_av"]["inputs"][1] != ours.nodes[f"{layer}.latent_cache_k"]["inputs"][0]


def test_llama_fixture_equals_upstream_step3(tmp_path):
    ours, upstream = run_upstream(fixture_dir(LLAMA70B_TP4), 2, tmp_path, deepseek=False)
    fixed, report = postprocess(ours)
    assert fixed.nodes == upstream["Nodes"]
    assert not report.mla and report.attention_layers == 80


def test_fixed_files_rewrite_the_npz(tmp_path):
    """INC's QUANTIZE reads only the NPZ: the fix must be in it, not only in the JSON."""
    name = StatsName("inc_measure_output", rank=0, world_size=1)
    attn = "model.layers.0.self_attn.attn.impl"
    nodes = {
        f"{attn}.matmul_qk": {"inputs": [[[1.0]], [[0.5]]]},
        f"{attn}.matmul_av": {"inputs": [[[1.0]], [[0.5]]]},
        f"{attn}.k_cache": {"inputs": [[[3.0]]]},
        f"{attn}.v_cache": {"inputs": [[[4.0]]]},
        f"{attn}.fused_scaled_dot_product_attention": {
            "inputs": [[[1.0]], [[1.0]], [[1.0]]],
            "outputs": [[[0.25]], [[9.0]]],
        },
        "model.layers.0.self_attn.o_proj": {"inputs": [[[0.75]]], "params": {"weight": [[0.1]]}},
    }
    fixed, report = postprocess(RankFile(name=name, nodes=nodes, mod_list=sorted(nodes)))
    assert (report.matmul_inputs_fixed, report.fsdpa_outputs_fixed) == (2, 1)
    write_rank_file(fixed, tmp_path)
    back = read_rank_file(tmp_path, name, check_npz=True)  # raises when NPZ and JSON disagree
    assert back.nodes[f"{attn}.matmul_qk"]["inputs"][1] == [[3.0]]
    assert back.nodes[f"{attn}.matmul_av"]["inputs"][1] == [[4.0]]
    assert back.nodes[f"{attn}.fused_scaled_dot_product_attention"]["outputs"] == [[[0.75]], [[9.0]]]
    assert nodes[f"{attn}.matmul_qk"]["inputs"][1] == [[0.5]], "the input rank file is left as it was"


def test_vllm_gaudi_mla_names():
    """vllm-gaudi names the MLA attention `mla_attn.mla_attn`: found by its `.impl.` children all the same."""
    attn = "model.layers.7.self_attn.mla_attn.mla_attn.impl"
    nodes = {
        f"{attn}.matmul_qk": {"inputs": [[[1.0]], [[0.5]]]},
        f"{attn}.matmul_av": {"inputs": [[[1.0]], [[0.5]]]},
        f"{attn}.latent_cache_k": {"inputs": [[[6.0]]]},
    }
    fixed, report = postprocess(RankFile(name=StatsName("p", rank=0, world_size=1), nodes=nodes))
    assert report.mla and fixed.nodes[f"{attn}.matmul_av"]["inputs"][1] == [[6.0]]
    assert fixed.nodes[f"{attn}.matmul_qk"]["inputs"][1] == [[6.0]]


VLLM_GAUDI_STEP3 = SHARED / "reference" / "vllm-gaudi" / "calibration" / "step-3-postprocess-measure.py"


def test_vllm_gaudi_deepseek_names_get_vllm_gaudis_step3(tmp_path):
    """With vllm-gaudi's DeepSeek names `self_attn.o_proj` exists beside the MLA FSDPA: the FSDPA output rule
    must not fire (vllm-gaudi's step 3, which its calibration runs with --deepseek, has only the cache rule)."""
    if not VLLM_GAUDI_STEP3.is_file():
        pytest.skip(f"upstream script not found at {VLLM_GAUDI_STEP3}")
    attn = "model.layers.0.self_attn.mla_attn.mla_attn.impl"
    nodes = {
        f"{attn}.matmul_qk": {"inputs": [[[1.0]], [[0.5]]], "outputs": [[[2.0]]]},
        f"{attn}.matmul_av": {"inputs": [[[1.0]], [[0.5]]], "outputs": [[[2.0]]]},
        f"{attn}.latent_cache_k": {"inputs": [[[6.0]]], "outputs": [[[6.0]]]},
        f"{attn}.fused_scaled_dot_product_attention": {"inputs": [[[1.0]], [[1.0]], [[1.0]]], "outputs": [[[3.0]]]},
        "model.layers.0.self_attn.o_proj": {"inputs": [[[9.0]]], "outputs": [[[1.0]]], "params": {"weight": [[0.1]]}},
    }
    name = StatsName("inc_measure_output", rank=0, world_size=1)
    fixed, report = postprocess(RankFile(name=name, nodes=nodes))
    assert report.mla and report.fsdpa_outputs_fixed == 0
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / f"{name.stem}.json").write_text(
        json.dumps({"GlobalRank": None, "LocalRank": 0, "Mode": "DynamicRange", "Nodes": nodes})
    )
    subprocess.run(
        [sys.executable, str(VLLM_GAUDI_STEP3), "-m", str(src), "-o", str(out), "-d"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    upstream = json.loads((out / f"{name.stem}.json").read_text())["Nodes"]
    assert upstream == fixed.nodes
