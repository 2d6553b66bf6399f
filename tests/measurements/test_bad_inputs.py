"""Every bad input: one line naming the file or rank with the fix, exit code != 0, nothing in --out."""

import json
import shutil

import pytest

from ray_calib.inc import RankFile, StatsName, npz, write_rank_file
from tests.measurements.synthetic import PREFIX, write_set


@pytest.fixture
def run_dir(tmp_path):
    write_set(tmp_path / "in", 4, experts=2)
    return tmp_path


def _stem(run_dir, rank, world=4):
    return run_dir / "in" / f"{PREFIX}_hooks_maxabs_{rank}_{world}"


def _fails(run_cli, run_dir, *match, to_tp=2, code=None):
    # the synthetic ranks hold different experts; no meta or config.json says so, so the flag does
    result = run_cli("unify", "--to-tp", to_tp, "--in", run_dir / "in", "--out", run_dir / "out", "--expert-parallel")
    assert result.exit_code != 0
    if code is not None:
        assert result.exit_code == code
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for text in match:
        assert text in result.stderr, result.stderr
    assert not (run_dir / "out").exists()
    return result.stderr


def test_missing_rank(run_cli, run_dir):
    for suffix in (".json", ".npz", "_mod_list.json"):
        _stem(run_dir, 2).with_name(_stem(run_dir, 2).name + suffix).unlink()
    _fails(run_cli, run_dir, "rank(s) 2 of 4 missing", f"{PREFIX}_hooks_maxabs_2_4.json", "copy them")


def test_duplicate_rank_from_a_renamed_copy(run_cli, run_dir):
    for suffix in (".json", ".npz"):
        shutil.copy(f"{_stem(run_dir, 1)}{suffix}", f"{_stem(run_dir, 2)}{suffix}")
    _fails(run_cli, run_dir, "hooks_maxabs_2_4.json", "LocalRank 1", "rank 2")


def test_world_sizes_disagree(run_cli, run_dir):
    shutil.copy(f"{_stem(run_dir, 0)}.json", f"{_stem(run_dir, 0, world=8)}.json")
    _fails(run_cli, run_dir, "mixes 2 runs", "world size 4", "world size 8", "move the files")


def test_leftovers_of_another_run(run_cli, run_dir):
    shutil.copy(f"{_stem(run_dir, 0)}.json", run_dir / "in" / "old_run_hooks_maxabs_0_4.json")
    _fails(run_cli, run_dir, "mixes 2 runs", "'old_run'", "move the files")


@pytest.mark.parametrize("to_tp, text", [(3, "4 % 3 = 1"), (4, "1 <= M < 4"), (8, "1 <= M < 4"), (0, "1 <= M")])
def test_target_size_must_divide_and_be_smaller(run_cli, run_dir, to_tp, text):
    stderr = _fails(run_cli, run_dir, text, to_tp=to_tp, code=2)
    assert "--to-tp" in stderr


def test_node_sets_differ(run_cli, run_dir):
    rank_file = RankFile(
        name=StatsName(PREFIX, rank=3, world_size=4), nodes={"model.layers.0.self_attn.qkv_proj": {"inputs": [[[1.0]]]}}
    )
    write_rank_file(rank_file, run_dir / "in")
    _fails(run_cli, run_dir, "rank 3", "different modules", "re-measure")


@pytest.mark.parametrize("content, text", [(None, "is truncated"), (b"{]", "is not valid JSON")])
def test_broken_json(run_cli, run_dir, content, text):
    path = _stem(run_dir, 1).with_suffix(".json")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content is None else content)
    _fails(run_cli, run_dir, "hooks_maxabs_1_4.json", text)


def test_npz_disagrees_with_json(run_cli, run_dir):
    path = _stem(run_dir, 1).with_suffix(".npz")
    stats = npz.load(path)
    stats["Nodes"]["model.layers.1.self_attn.qkv_proj"]["inputs"] = [[[123.0]]]
    npz.save(path, stats)
    _fails(run_cli, run_dir, "hooks_maxabs_1_4.npz", "disagrees with", "model.layers.1.self_attn.qkv_proj")


def test_nan_and_inf_are_refused_but_inspect_counts_them(run_cli, run_dir):
    path = _stem(run_dir, 0).with_suffix(".json")
    stats = json.loads(path.read_text())
    stats["Nodes"]["model.layers.0.self_attn.o_proj"]["outputs"][1] = [[float("inf")]]
    stats["Nodes"]["model.layers.1.self_attn.qkv_proj"]["inputs"] = [[[float("nan")]]]
    path.write_text(json.dumps(stats))  # Python's json writes Infinity / NaN, as INC would
    npz.save(path.with_suffix(".npz"), stats)
    _fails(run_cli, run_dir, "hooks_maxabs_0_4.json", "model.layers.0.self_attn.o_proj", "inf", "outputs[1]")
    result = run_cli("inspect", run_dir / "in")
    assert result.exit_code == 0, result.stderr
    assert "1 NaN, 1 inf" in result.stdout


def test_output_holding_another_run_needs_force(run_cli, run_dir):
    out = run_dir / "out"
    write_set(out, 2, prefix="someone_else")
    before = sorted(p.name for p in out.iterdir())
    result = run_cli("unify", "--to-tp", 2, "--in", run_dir / "in", "--out", out, "--expert-parallel")
    assert result.exit_code == 3
    assert "already holds another run ('someone_else', world size 2)" in result.stderr and "--force" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == before
    result = run_cli("unify", "--to-tp", 2, "--in", run_dir / "in", "--out", out, "--force", "--expert-parallel")
    assert result.exit_code == 0, result.stderr
    assert not list(out.glob("someone_else*"))
    assert len(list(out.glob(f"{PREFIX}_hooks_maxabs_*_2.npz"))) == 2
    # the same run again is not "another run": no --force needed
    assert run_cli("unify", "--to-tp", 2, "--in", run_dir / "in", "--out", out, "--expert-parallel").exit_code == 0


def test_empty_and_missing_input(run_cli, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("unify", "--to-tp", 1, "--in", tmp_path / "empty", "--out", tmp_path / "out")
    assert result.exit_code != 0 and "holds no INC measurement files" in result.stderr
    result = run_cli("unify", "--to-tp", 1, "--in", tmp_path / "nope", "--out", tmp_path / "out")
    assert result.exit_code != 0 and "is not a directory" in result.stderr


def _edit_rank(run_dir, rank, edit):
    """Change one rank's stats in JSON and NPZ alike (so only the new difference is tested)."""
    path = _stem(run_dir, rank).with_suffix(".json")
    stats = json.loads(path.read_text())
    edit(stats["Nodes"])
    path.write_text(json.dumps(stats))
    npz.save(path.with_suffix(".npz"), stats)


@pytest.mark.parametrize(
    "edit, text",
    [
        (
            lambda nodes: nodes["model.layers.0.self_attn.o_proj"]["outputs"].pop(),
            "outputs count differs between ranks",
        ),
        (lambda nodes: nodes["model.layers.1.self_attn.qkv_proj"].pop("params"), "fields differ between ranks"),
        (
            lambda nodes: nodes["model.layers.1.self_attn.qkv_proj"]["params"].update(weight=[[1.0], [2.0]]),
            "leaf shapes differ between ranks",
        ),  # next to a per-tensor [[v]]: never silently cut to one channel
    ],
)
def test_nodes_that_differ_between_ranks_of_a_group(run_cli, run_dir, edit, text):
    _edit_rank(run_dir, 1, edit)
    _fails(run_cli, run_dir, "model.layers", text, "re-measure")


def test_scale_files_with_different_modules_on_another_group(run_cli, run_dir):
    for rank in range(4):
        stats = json.loads(_stem(run_dir, rank).with_suffix(".json").read_text())
        if rank >= 2:
            del stats["Nodes"]["model.layers.0.self_attn.qkv_proj"]
        write_rank_file(
            RankFile(
                name=StatsName(PREFIX, rank=rank, world_size=4, method="MAXABS_HW"), nodes=stats["Nodes"], mode="Scale"
            ),
            run_dir / "in",
        )
    _fails(run_cli, run_dir, "MAXABS_HW", "different modules")


def test_sidecar_field_of_the_wrong_type(run_cli, run_dir):
    (run_dir / "in" / "ray_calib_meta.json").write_text(json.dumps({"tp_size": 4, "ep_size": "x"}))
    _fails(run_cli, run_dir, "ray_calib_meta.json", "'ep_size'", "expected int")


def test_out_below_an_existing_file(run_cli, run_dir):
    (run_dir / "a_file").write_text("x")
    result = run_cli(
        "unify", "--to-tp", 2, "--in", run_dir / "in", "--out", run_dir / "a_file" / "out", "--expert-parallel"
    )
    assert result.exit_code != 0 and result.stderr.startswith("error: ") and "choose another path" in result.stderr
