"""The hessian files of `measure --hessians`: round trip, the whole-model merge of TP ranks, bad sets."""

from __future__ import annotations

import numpy as np
import pytest

from ray_calib.errors import MeasurementError
from ray_calib.measurements import hessians
from ray_calib.measurements.hessians import Hessians


def gram(x: np.ndarray) -> np.ndarray:
    return (x.T @ x).astype(np.float32)


def test_ranks_merge_to_the_whole_models_hessian_blocks(tmp_path):
    """TP2: q_proj sees the whole input on both ranks, o_proj each rank's half of it."""
    rng = np.random.default_rng(0)
    hidden, attn = rng.standard_normal((40, 6)), rng.standard_normal((40, 8))
    for rank in range(2):
        part = attn[:, 4 * rank : 4 * rank + 4]
        matrices = {"layers.0.q_proj": gram(hidden), "layers.0.o_proj": gram(part)}
        hessians.write(tmp_path / hessians.rank_file_name(rank, 2), Hessians(matrices, {"layers.0.o_proj"}, 40))
    whole = hessians.load_model_hessians(tmp_path)
    assert whole is not None and whole.tokens == 40
    np.testing.assert_allclose(whole.matrices["layers.0.q_proj"], gram(hidden), rtol=1e-6)
    full = gram(attn)
    expected = np.zeros_like(full)
    expected[:4, :4], expected[4:, 4:] = full[:4, :4], full[4:, 4:]
    np.testing.assert_allclose(whole.matrices["layers.0.o_proj"], expected, rtol=1e-5, atol=1e-5)


def test_unify_writes_one_model_file_that_quantize_reads(tmp_path):
    run, stage = tmp_path / "measure", tmp_path / "unified"
    run.mkdir(), stage.mkdir()
    hessians.write(run / hessians.rank_file_name(0, 1), Hessians({"a": np.eye(3, dtype=np.float32)}, set(), 9))
    assert hessians.unify(run, stage)
    assert [p.name for p in stage.iterdir()] == [hessians.MODEL_FILE]
    np.testing.assert_array_equal(hessians.load_model_hessians(stage).matrices["a"], np.eye(3))
    without = tmp_path / "measured-without-hessians"
    without.mkdir()
    assert not hessians.unify(without, tmp_path) and hessians.load_model_hessians(without) is None


def test_chunks_add_up():
    a = Hessians({"x": np.ones((2, 2), np.float32)}, set(), 3)
    b = Hessians({"x": 2 * np.ones((2, 2), np.float32)}, set(), 4)
    total = a.add(b)
    assert total.tokens == 7 and total.matrices["x"][0, 0] == 3.0


def test_a_missing_rank_is_refused(tmp_path):
    hessians.write(tmp_path / hessians.rank_file_name(1, 2), Hessians({"a": np.eye(2, dtype=np.float32)}, set(), 1))
    with pytest.raises(MeasurementError, match=r"ranks \[1\], not ranks 0..1"):
        hessians.load_model_hessians(tmp_path)


def test_a_damaged_file_is_one_error(tmp_path):
    (tmp_path / hessians.rank_file_name(0, 1)).write_bytes(b"not safetensors")
    with pytest.raises(MeasurementError, match="unreadable"):
        hessians.load_model_hessians(tmp_path)
