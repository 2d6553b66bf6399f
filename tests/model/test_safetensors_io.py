"""The streaming shard writer's write-behind thread and block copies: same bytes as writing inline, errors surface."""

from __future__ import annotations

import numpy as np
import pytest

from ray_calib.model.safetensors_io import PlannedTensor, ShardReader, ShardWriter, file_sha256


def _write(path, plan, arrays, **options) -> str:
    with ShardWriter(path, plan, **options) as writer:
        for item, array in zip(plan, arrays):
            writer.write_raw(item.name, array)
        return writer.close()


def test_write_behind_writes_the_same_file_as_inline(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, size=n, dtype=np.uint8) for n in (3 << 20, 5, 2 << 20)]
    plan = [PlannedTensor(f"t{i}", "U8", (a.size,)) for i, a in enumerate(arrays)]
    inline = _write(tmp_path / "a.safetensors", plan, arrays)
    behind = _write(tmp_path / "b.safetensors", plan, arrays, write_behind=True)
    assert inline == behind == file_sha256(tmp_path / "b.safetensors")
    with ShardReader(tmp_path / "b.safetensors") as reader:
        assert np.array_equal(reader.read_raw("t2"), arrays[2])
        block = np.empty(7, dtype=np.uint8)
        assert np.array_equal(reader.read_range("t0", 100, block), arrays[0][100:107])


def test_write_chunks_checks_the_planned_size(tmp_path):
    plan = [PlannedTensor("t", "U8", (10,))]
    with pytest.raises(AssertionError, match="9 bytes do not match"):
        with ShardWriter(tmp_path / "c.safetensors", plan, write_behind=True) as writer:
            writer.write_chunks("t", [np.zeros(4, np.uint8), np.zeros(5, np.uint8)])
    assert list(tmp_path.iterdir()) == []  # the temp file went with the error


def test_a_failed_write_behind_surfaces_and_leaves_no_file(tmp_path, monkeypatch):
    plan = [PlannedTensor("t0", "U8", (4 << 20,)), PlannedTensor("t1", "U8", (4 << 20,))]
    writer = ShardWriter(tmp_path / "d.safetensors", plan, write_behind=True)
    real = writer._write
    calls = []

    def failing(data):
        calls.append(len(data))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(data)

    monkeypatch.setattr(writer, "_write", failing)
    with pytest.raises(OSError, match="No space left"):
        with writer:
            writer.write_raw("t0", np.zeros(4 << 20, np.uint8))
            writer.write_raw("t1", np.zeros(4 << 20, np.uint8))
            writer.close()
    assert list(tmp_path.iterdir()) == []
