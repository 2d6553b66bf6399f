"""The Gaudi INC path, run here: INC's own MEASURE in vLLM's CPU workers, gathered, unified, then QUANTIZE.

`RAY_CALIB_INC_ON_CPU=1` makes vLLM's CPU model runner do what vllm-gaudi's does (INC prepare/convert
after load, see ray_calib/measure/inc_cpu.py); everything else is the production INC backend:
QUANT_CONFIG written on every node and set in the Ray job env first, INC's own per-rank dump
(`finalize_calibration` on the prepared model), files read back over collective_rpc to the head,
per-chunk checkpoints, cleanup. INC's CPU path covers the linear layers only.

1. measure at TP 2 over two Ray nodes (127.0.0.1 and 127.0.0.2) and at TP 1 on one node;
2. unify the TP 2 files to TP 1: weights and everything upstream of the first all-reduce equal INC's own
   TP 1 measurement exactly, later activations within bf16 noise;
3. `quantize --device gaudi2` writes the one-node QUANTIZE config for the unified files; INC's QUANTIZE
   loads them in vLLM (CPU: quantize-dequantize, maxabs_pow2 instead of Gaudi's HW scales) and generates.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ray_calib.inc import MeasurementSet, read_meta
from ray_calib.ladder.inc_generate import read_result
from ray_calib.measurements.pipeline import unify_dir
from tests.measure.conftest import REPO, measure_args, measure_env, run_measure
from tests.measure.test_reshard_invariant import Diff
from tests.measure.test_resume_and_ray import two_ray_nodes  # noqa: F401 - fixture

pytestmark = [pytest.mark.slow, pytest.mark.extended, pytest.mark.cluster]
INC_ON_CPU = {"RAY_CALIB_INC_ON_CPU": "1"}


def reduces_upstream(name: str) -> int:
    """All-reduces before this node's input in a dense decoder: o_proj and down_proj of every earlier layer."""
    layer = int(name.split(".")[2])
    return 2 * layer + (1 if ".mlp." in name else 0)


def compare_with_direct(unified, direct) -> Diff:
    """Exact where the re-shard invariant is exact; returns the worst input difference.

    Downstream of an all-reduce a run at another TP rounds twice more (each rank's partial sum to bf16,
    then the sum), and RMSNorm and maxabs carry a relative error on unchanged to first order, so a node
    may differ by at most 2 bf16 spacings per all-reduce upstream of it, plus 1 for its own rounding.
    Outputs are left out: a row-parallel output[0] is a pre-reduce partial by definition, and at TP 1 INC
    records its output[1] from an uninitialized `torch.empty(1)` (its no-reduce path), so it is noise there.
    """
    worst = Diff()
    assert set(unified.nodes) == set(direct.nodes)
    for name, want in direct.nodes.items():
        got = unified.nodes[name]
        assert got["params"]["weight"] == want["params"]["weight"], f"{name}: weight range must be exact"
        a, b = got["inputs"][0][0][0], want["inputs"][0][0][0]
        if name.startswith("model.layers.0.self_attn."):
            assert a == b, f"{name}: {a} != {b} (upstream of the first all-reduce: must be exact)"
        diff = Diff.of(a, b)
        assert diff.spacings <= 2 * reduces_upstream(name) + 1, f"{name}: {a} vs {b} ({diff.spacings:.1f} spacings)"
        worst |= diff
    return worst


def test_inc_measure_gather_unify_quantize(tiny_models, calib_set, tmp_path, two_ray_nodes):  # noqa: F811
    model = tiny_models["llama"]
    run_dir = tmp_path / "run"
    two_nodes = run_measure(
        measure_args(model, calib_set, run_dir / "measure", 2, fp8_kv=False), env={**two_ray_nodes, **INC_ON_CPU}
    ).check()
    meta = read_meta(run_dir / "measure")
    assert (meta.extra["executor"], meta.extra["backend"], meta.tp_size, meta.ep_size) == ("ray", "inc", 2, 1)
    assert "[ray]" in two_nodes.stdout
    measured = MeasurementSet.discover(run_dir / "measure").read_all()
    assert [r.rank for r in measured] == [0, 1] and len(measured[0].nodes) == 16  # 4 linear layers x 4 blocks
    assert (
        measured[0].nodes["model.layers.0.self_attn.qkv_proj"]["params"]["weight"]
        != measured[1].nodes["model.layers.0.self_attn.qkv_proj"]["params"]["weight"]
    )  # each rank its own shard

    direct = tmp_path / "direct"
    run_measure(measure_args(model, calib_set, direct, 1, fp8_kv=False), env={**measure_env(), **INC_ON_CPU}).check()
    summary = unify_dir(run_dir / "measure", run_dir / "unified-tp1", 1)
    assert not summary.expert_parallel
    worst = compare_with_direct(
        MeasurementSet.discover(run_dir / "unified-tp1").read(0), MeasurementSet.discover(direct).read(0)
    )
    print(
        f"INC on CPU: unify(TP2 -> 1) vs TP1, worst input difference {worst.relative:.4f} "
        f"({worst.spacings:.1f} bf16 spacings)"
    )

    quantize = subprocess.run(
        # measured with INC on CPU (run.json: device_type cpu); the Gaudi config is wanted: an explicit override
        [
            sys.executable,
            "-m",
            "ray_calib.cli",
            "quantize",
            "--device",
            "gaudi2",
            "--override-run",
            "--run-dir",
            str(run_dir),
        ],
        cwd=REPO,
        env=measure_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert quantize.returncode == 0, quantize.stderr
    gaudi_config = json.loads((run_dir / "configs" / "inc_quant_one_node_config.json").read_text())
    assert gaudi_config["dump_stats_path"] == str(run_dir / "unified-tp1" / "inc_measure_output")
    assert gaudi_config["scale_method"] == "maxabs_hw"
    # INC on CPU has no Gaudi HW scales: same config, maxabs_pow2, quantize-dequantize
    cpu_config = tmp_path / "quant_cpu.json"
    cpu_config.write_text(json.dumps({**gaudi_config, "scale_method": "maxabs_pow2", "use_qdq": True}))
    generated = subprocess.run(
        [sys.executable, "-m", "ray_calib.ladder.inc_generate", str(model), str(cpu_config)],
        cwd=REPO,
        env={**measure_env(), **INC_ON_CPU},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert generated.returncode == 0, generated.stderr[-3000:]
    result = read_result(generated.stdout)
    assert result["patched"] >= 16 and all(result["completions"])
    scale_files = sorted(p.name for p in (run_dir / "unified-tp1").glob("*MAXABS_POW2*.json"))
    assert scale_files, "INC's QUANTIZE computed and saved scales from the unified measurements"
    compare_scales_with_ours(run_dir / "unified-tp1", tmp_path / "ours")


def compare_scales_with_ours(unified: Path, ours_dir: Path) -> None:
    """INC's own maxabs_pow2 scales from the unified files against `ray-calib scales` on the same files.

    Every node must be equal: inputs, weights and outputs (a row-parallel output scaled from its measured
    pre-reduce max, outputs[0], as INC does), checked on INC's file against our rule and against our file.
    """
    from ray_calib.inc.devices import get_device
    from ray_calib.inc.methods import get_method, scale_from_maxabs
    from ray_calib.inc.rankfile import node_values
    from ray_calib.scales.files import ScaleRequest, make_scales

    ranges = MeasurementSet.discover(unified).read(0)
    inc = MeasurementSet.discover(unified, method="MAXABS_POW2").read(0, check_npz=False)
    make_scales(ScaleRequest(unified, ours_dir, method="maxabs_pow2", device="cpu"))
    ours = MeasurementSet.discover(ours_dir, method="MAXABS_POW2").read(0)
    rule, cpu = get_method("maxabs_pow2").activation, get_device("cpu")
    row_parallel = 0
    for name, node in inc.nodes.items():
        measured = ranges.nodes[name]
        if len(measured.get("outputs", [])) == 2:  # row-parallel: [pre-reduce max, reduced]
            pre_reduce = max(node_values({"outputs": measured["outputs"][:1]}))
            assert list(node_values({"outputs": node["outputs"]})) == [scale_from_maxabs(pre_reduce, rule, cpu)], name
            row_parallel += 1
        assert node == ours.nodes[name], name
    print(f"INC on CPU: {len(inc.nodes)} scale nodes ({row_parallel} row-parallel) equal ray-calib's")
