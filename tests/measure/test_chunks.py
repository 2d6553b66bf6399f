"""Chunk checkpoints and their max-merge, without vLLM."""

from __future__ import annotations

import pytest

from ray_calib.errors import ConfigError, EngineError, MeasurementError, OutputExistsError
from ray_calib.inc import RankFile, StatsName
from ray_calib.measure.chunks import ChunkResult, ChunkStore, check_gathered_ranks, rank_file_from_result
from ray_calib.measurements.merge import merge_chunks


def rank(r: int, nodes: dict, world: int = 2, mod_list=None) -> RankFile:
    return RankFile(
        name=StatsName("inc_measure_output", rank=r, world_size=world), nodes=nodes, mod_list=mod_list or list(nodes)
    )


def test_merge_is_element_wise_max_and_keeps_modules_seen_once():
    a = rank(0, {"x": {"inputs": [[[1.0]]], "outputs": [[[5.0]], [[2.0]]], "params": {"weight": [[0.5]]}}})
    b = rank(
        0,
        {
            "x": {"inputs": [[[3.0]]], "outputs": [[[4.0]], [[2.5]]], "params": {"weight": [[0.5]]}},
            "y": {"inputs": [[[7.0]]]},
        },
        mod_list=["x", "y", "z"],
    )
    merged = merge_chunks(a, b)
    assert merged.nodes == {
        "x": {"inputs": [[[3.0]]], "outputs": [[[5.0]], [[2.5]]], "params": {"weight": [[0.5]]}},
        "y": {"inputs": [[[7.0]]]},
    }
    assert merged.mod_list == ["x", "y", "z"]
    assert a.nodes["x"]["inputs"] == [[[1.0]]], "inputs are not modified"
    assert merge_chunks(b, a).nodes == merged.nodes


def test_merge_refuses_other_ranks_and_shapes():
    with pytest.raises(MeasurementError, match="cannot merge rank 1/2 into rank 0/2"):
        merge_chunks(rank(0, {}), rank(1, {}))
    with pytest.raises(MeasurementError, match="outputs count differs"):
        merge_chunks(
            rank(0, {"x": {"inputs": [[[1.0]]], "outputs": [[[1.0]]]}}),
            rank(0, {"x": {"inputs": [[[1.0]]], "outputs": [[[1.0]], [[1.0]]]}}),
        )


def chunk(index: int, value: float) -> ChunkResult:
    results = [
        {"rank": r, "world_size": 2, "nodes": {"a": {"inputs": [[[value + r]]]}}, "mod_list": ["a"]} for r in range(2)
    ]
    return ChunkResult(
        index=index,
        rank_files=[rank_file_from_result(x, "inc_measure_output") for x in results],
        experts={"moe": [1, 0]},
        num_tokens=10,
        num_prompts=2,
        generated_tokens=3,
    )


def test_checkpoints_round_trip_and_resume_rules(tmp_path):
    fingerprint = {"model": "m", "tp_size": 2}
    store = ChunkStore(tmp_path, fingerprint)
    assert store.prepare(resume=False) == []
    store.write(chunk(0, 1.0))
    store.write(chunk(2, 5.0))
    assert sorted(p.name for p in store.root.iterdir()) == ["chunk-00000", "chunk-00002", "run.json"]
    back = store.read(2, "inc_measure_output")
    assert [rf.nodes for rf in back.rank_files] == [{"a": {"inputs": [[[5.0]]]}}, {"a": {"inputs": [[[6.0]]]}}]
    assert (back.experts, back.num_tokens, back.generated_tokens) == ({"moe": [1, 0]}, 10, 3)
    with pytest.raises(OutputExistsError, match="pass --resume"):
        ChunkStore(tmp_path, fingerprint).prepare(resume=False)
    assert ChunkStore(tmp_path, fingerprint).prepare(resume=True) == [0, 2]
    with pytest.raises(ConfigError, match="tp_size: 2 -> 4"):
        ChunkStore(tmp_path, {"model": "m", "tp_size": 4}).prepare(resume=True)
    store.clear()
    with pytest.raises(ConfigError, match="no checkpoints"):
        ChunkStore(tmp_path, fingerprint).prepare(resume=True)


def test_a_chunk_that_fails_mid_write_leaves_nothing(tmp_path, monkeypatch):
    store = ChunkStore(tmp_path, {})
    store.prepare(resume=False)
    import ray_calib.measure.chunks as chunks

    def broken(rank_file, directory):
        raise OSError("disk full")

    monkeypatch.setattr(chunks, "write_rank_file", broken)
    with pytest.raises(OSError):
        store.write(chunk(0, 1.0))
    assert store.done() == [] and [p.name for p in store.root.iterdir()] == ["run.json"]


def test_truncated_checkpoint_files_are_one_line_errors(tmp_path):
    """A run.json or chunk.json cut short by a crash names the file and how to start over, not a traceback."""
    store = ChunkStore(tmp_path, {"model": "m"})
    store.prepare(resume=False)
    store.write(chunk(0, 1.0))
    chunk_file = store.root / "chunk-00000" / "chunk.json"
    chunk_file.write_text(chunk_file.read_text()[:20])
    with pytest.raises(MeasurementError, match=r"chunk\.json: is truncated.*") as err:
        store.read(0, "inc_measure_output")
    assert str(store.root) in (err.value.fix or "")
    (store.root / "run.json").write_text('{"model": ')
    with pytest.raises(MeasurementError, match=r"run\.json: is truncated") as err:
        ChunkStore(tmp_path, {"model": "m"}).prepare(resume=True)
    assert str(store.root) in (err.value.fix or "") and "re-copy" not in str(err.value)


@pytest.mark.parametrize("prefix", ["inc_measure_output", "run_7_of_9", "x_hooks_maxabs_out"])
def test_chunk_names_are_parsed_by_the_one_name_parser(tmp_path, prefix):
    """Prefixes with digits and underscores read back; a name of another prefix or kind is refused."""
    store = ChunkStore(tmp_path, {})
    store.prepare(resume=False)
    results = [
        {"rank": r, "world_size": 2, "nodes": {"a": {"inputs": [[[1.0 + r]]]}}, "mod_list": ["a"]} for r in range(2)
    ]
    store.write(ChunkResult(index=0, rank_files=[rank_file_from_result(x, prefix) for x in results]))
    assert [rf.name.rank for rf in store.read(0, prefix).rank_files] == [0, 1]
    with pytest.raises(MeasurementError, match="expected prefix other"):
        store.read(0, "other")
    info = store.root / "chunk-00000" / "chunk.json"
    original = info.read_text()
    for wrong in (f"{prefix}_hooks_maxabs_MAXABS_0_2", f"{prefix}_hooks_maxabs_x_2", "notes"):
        info.write_text(original.replace(f"{prefix}_hooks_maxabs_0_2", wrong))
        with pytest.raises(MeasurementError, match=f"names {wrong}, expected"):
            store.read(0, prefix)


def test_hessians_ride_in_the_checkpoints(tmp_path):
    """--hessians: each rank's H of a chunk comes back from its checkpoint, whole (resume sums them)."""
    import numpy as np

    from ray_calib.measurements.hessians import Hessians

    store = ChunkStore(tmp_path, {"model": "m", "hessians": True})
    store.prepare(resume=False)
    written = chunk(1, 1.0)
    written.hessians = [
        Hessians({"a": np.full((3, 3), r + 1, np.float32)}, {"a"} if r else set(), 10) for r in range(2)
    ]
    store.write(written)
    back = store.read(1, "inc_measure_output").hessians
    assert [h.matrices["a"][0, 0] for h in back] == [1.0, 2.0] and [h.sharded for h in back] == [set(), {"a"}]
    assert back[0].tokens == 10 and chunk(0, 1.0).hessians == []


def test_hessians_cross_every_executor_as_float32_bytes():
    """vLLM's msgpack (Ray executor) turns numpy arrays into [dtype, shape, buffer] lists; bytes pass as they are."""
    import numpy as np
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from ray_calib.measure.chunks import hessians_from_result

    h = np.arange(9, dtype=np.float32).reshape(3, 3)
    sent = {"hessians": {"a": h.tobytes()}, "sharded": ["a"], "tokens": 4}
    back = hessians_from_result(MsgpackDecoder().decode(MsgpackEncoder().encode(sent)))
    np.testing.assert_array_equal(back.matrices["a"], h)
    assert back.sharded == {"a"} and back.tokens == 4


def test_gathered_ranks_must_be_exactly_0_to_n_minus_1():
    """A worker that answers twice (or not at all) used to be written as a rank file of the run."""
    check_gathered_ranks([2, 0, 1], 3, chunk=0)
    for ranks in ([0, 0, 2], [0, 1], [0, 1, 2, 3], [0, None, 2]):
        with pytest.raises(EngineError, match="chunk 4: gathered the stats of ranks .* expected exactly 0..2"):
            check_gathered_ranks(ranks, 3, chunk=4)
