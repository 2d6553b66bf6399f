"""INC's own MAXABS_HW files of a real Gaudi3 run (fixture inc-llama31-70b-g3-tp2): reproduced, and read everywhere."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest

from ray_calib.inc import MeasurementSet, npz
from ray_calib.inc.rankfile import same_values
from tests.conftest import LLAMA31_G3_TP2, fixture_dir

pytestmark = pytest.mark.fixtures
SCALES = "inc_output_hooks_maxabs_MAXABS_HW_{rank}_2"


def _inc(rank: int, suffix: str):
    path = fixture_dir(LLAMA31_G3_TP2) / (SCALES.format(rank=rank) + suffix)
    return json.loads(path.read_text())["Nodes"] if suffix == ".json" else npz.load(path)["Nodes"]


def test_scales_cli_reproduces_incs_files_node_for_node(run_cli, tmp_path):
    result = run_cli(
        "scales",
        "--scale-method",
        "maxabs_hw",
        "--device",
        "gaudi3",
        "--in",
        fixture_dir(LLAMA31_G3_TP2),
        "--out",
        tmp_path,
    )
    assert result.exit_code == 0, result.stderr
    assert "bf16 math" in result.stdout
    for rank in range(2):
        for suffix in (".json", ".npz"):
            inc, ours = _inc(rank, suffix), _load(tmp_path / (SCALES.format(rank=rank) + suffix))
            same = [name for name, node in inc.items() if ours.get(name) == node]
            assert len(same) == len(inc) == 880, [n for n in inc if n not in same][:3]
            assert set(ours) - set(inc) == {"lm_head"}  # measured, but blocklisted in that run's QUANTIZE config


def _load(path):
    return json.loads(path.read_text())["Nodes"] if path.suffix == ".json" else npz.load(path)["Nodes"]


def test_with_incs_blocklist_the_files_are_incs_byte_for_byte_in_the_npz(run_cli, tmp_path):
    result = run_cli(
        "scales",
        "--scale-method",
        "maxabs_hw",
        "--device",
        "gaudi3",
        "--blocklist",
        r"^lm_head$",
        "--in",
        fixture_dir(LLAMA31_G3_TP2),
        "--out",
        tmp_path,
    )
    assert result.exit_code == 0, result.stderr
    assert "1 blocklisted" in result.stdout
    for rank in range(2):
        stem = SCALES.format(rank=rank)
        ours, inc = (zipfile.ZipFile(d / f"{stem}.npz").read("arr_0.npy") for d in (tmp_path, LLAMA31_G3_TP2))
        assert ours == inc
        assert json.loads((tmp_path / f"{stem}.json").read_text()) == json.loads(
            (LLAMA31_G3_TP2 / f"{stem}.json").read_text()
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{SCALES.format(rank=r)}{s}" for r in range(2) for s in (".json", ".npz")
    )  # no _mod_list.json


def test_float64_math_would_not_reproduce_them(tmp_path):
    """The bf16 emulation is what makes the difference (it is not a test that cannot fail)."""
    from dataclasses import replace

    from ray_calib.inc.arith import FloatMath
    from ray_calib.inc.devices import DEVICES
    from ray_calib.inc.methods import get_method
    from ray_calib.scales.files import write_scale_files

    class Float64Gaudi3(type(DEVICES["gaudi3"])):
        math = FloatMath

    device = Float64Gaudi3(
        **{f: getattr(DEVICES["gaudi3"], f) for f in ("name", "fullscale", "hw_exponents", "hw_factor")}
    )
    write_scale_files(fixture_dir(LLAMA31_G3_TP2), tmp_path, get_method("maxabs_hw"), replace(device))
    inc, ours = _inc(0, ".json"), _load(tmp_path / (SCALES.format(rank=0) + ".json"))
    differ = [name for name, node in inc.items() if ours[name] != node]
    assert 0.01 * len(inc) < len(differ) < 0.1 * len(inc)


def test_unify_of_range_and_scale_files_and_back_through_expand(run_cli, tmp_path):
    """TP2 -> TP1 unifies INC's scale files as INC would compute them from the unified ranges; expand and unify
    again give the TP1 files back, scale files included."""
    one, two, again = tmp_path / "tp1", tmp_path / "ep2", tmp_path / "tp1-again"
    assert run_cli("unify", "--to-tp", 1, "--in", fixture_dir(LLAMA31_G3_TP2), "--out", one).exit_code == 0
    result = run_cli(
        "scales",
        "--scale-method",
        "maxabs_hw",
        "--device",
        "gaudi3",
        "--blocklist",
        "^lm_head$",
        "--in",
        one,
        "--out",
        tmp_path / "recomputed",
    )
    assert result.exit_code == 0, result.stderr
    unified = MeasurementSet.discover(one, method="MAXABS_HW").read(0)
    recomputed = MeasurementSet.discover(tmp_path / "recomputed", method="MAXABS_HW").read(0)
    assert unified.nodes == recomputed.nodes  # incl. output products rebuilt from the merged factors
    result = run_cli("expand", "--to-ranks", 2, "--in", one, "--out", two)
    assert result.exit_code == 0, result.stderr
    assert "scale files expanded too: MAXABS_HW" in result.stdout
    assert run_cli("unify", "--to-tp", 1, "--in", two, "--out", again).exit_code == 0
    for method in (None, "MAXABS_HW"):
        first, second = (MeasurementSet.discover(d, method=method).read(0) for d in (one, again))
        assert first.nodes == second.nodes and first.mode == second.mode
    for path in (one, again):
        stem = SCALES.format(rank=0).replace("_0_2", "_0_1")
        assert zipfile.ZipFile(path / f"{stem}.npz").read("arr_0.npy") == npz.image(
            MeasurementSet.discover(one, method="MAXABS_HW").read(0).to_stats()
        )


def test_inspect_and_unify_read_a_directory_of_incs_scale_files_only(run_cli, tmp_path):
    for path in LLAMA31_G3_TP2.glob("*MAXABS_HW*"):
        shutil.copy(path, tmp_path)
    result = run_cli("inspect", tmp_path)
    assert result.exit_code == 0, result.stderr
    assert "no range files; MAXABS_HW scale files" in result.stdout and "nodes per rank 880" in result.stdout
    assert "5280 finite" in result.stdout
    result = run_cli("inspect", fixture_dir(LLAMA31_G3_TP2))
    assert "scale files MAXABS_HW: nodes per rank 880, values 5280 finite" in result.stdout
    result = run_cli("unify", "--to-tp", 1, "--in", tmp_path, "--out", tmp_path / "one")
    assert result.exit_code == 0, result.stderr
    assert MeasurementSet.discover(tmp_path / "one", method="MAXABS_HW").read(0).nodes
    result = run_cli("scales", "--device", "gaudi3", "--in", tmp_path, "--out", tmp_path / "x")
    assert result.exit_code != 0 and "holds INC scale files (MAXABS_HW) but no range files" in result.stderr
    result = run_cli("report", tmp_path, "--out", tmp_path / "report")
    assert result.exit_code != 0 and "no range files" in result.stderr and "Traceback" not in result.stderr


def test_json_and_npz_compared_by_value_and_a_real_difference_names_the_npz(run_cli, tmp_path):
    for path in LLAMA31_G3_TP2.glob("*MAXABS_HW*"):
        shutil.copy(path, tmp_path)
    inc_json, inc_npz = _inc(0, ".json"), _inc(0, ".npz")
    name = "model.layers.0.self_attn.o_proj"
    assert inc_npz[name]["outputs"] == (inc_json[name]["outputs"][0],)  # a tuple in the NPZ, a list in the JSON
    assert same_values(inc_json, inc_npz)
    stem = SCALES.format(rank=0)
    stats = json.loads((tmp_path / f"{stem}.json").read_text())
    stats["Nodes"][name]["inputs"] = [0.5]
    (tmp_path / f"{stem}.json").write_text(json.dumps(stats, indent=4))
    result = run_cli("inspect", tmp_path)
    assert result.exit_code != 0
    assert f"{stem}.npz: disagrees with {stem}.json at node '{name}' inputs[0]" in result.stderr
    assert f"INC's QUANTIZE reads only {stem}.npz" in result.stderr


def test_report_reads_the_range_files_beside_incs_scale_files(run_cli, tmp_path):
    result = run_cli("report", fixture_dir(LLAMA31_G3_TP2), "--out", tmp_path)
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "summary.txt").exists()


def test_pull_brings_back_incs_files_and_they_read(run_cli, tmp_path, monkeypatch):
    """push a run holding INC's range + scale files to the hub stand-in, pull it elsewhere, read it there."""
    import huggingface_hub.constants as constants

    from ray_calib.rundir import RunDir
    from ray_calib.testing.hub_standin import DEFAULT_TOKEN, StandinHub

    run = RunDir(tmp_path / "run")
    shutil.copytree(fixture_dir(LLAMA31_G3_TP2), run.measure)
    hub = StandinHub(tmp_path / "hub").start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", DEFAULT_TOKEN)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the stand-in speaks plain LFS only
        # measurements only (no checkpoint to evaluate): published unverified, as the card says
        assert run_cli("push", "--repo", "standin/inc-g3", "--run-dir", run.root, "--no-verify").exit_code == 0
        result = run_cli("pull", "--repo", "standin/inc-g3", "--out", tmp_path / "back")
        assert result.exit_code == 0, result.stderr
    finally:
        hub.stop()
    pulled = tmp_path / "back" / "measure"
    for path in LLAMA31_G3_TP2.iterdir():
        assert (pulled / path.name).read_bytes() == path.read_bytes()
    result = run_cli("inspect", pulled)
    assert result.exit_code == 0 and "scale files MAXABS_HW: nodes per rank 880" in result.stdout
    assert run_cli("unify", "--to-tp", 1, "--in", pulled, "--out", tmp_path / "one").exit_code == 0
