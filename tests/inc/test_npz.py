"""The NPZ codec: byte-compatible with numpy both ways, and a pickle that runs code is refused."""

import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest

from ray_calib.errors import MeasurementError
from ray_calib.inc import npz

STATS = {
    "GlobalRank": None,
    "LocalRank": 3,
    "Mode": "DynamicRange",
    "Nodes": {
        "a.qkv_proj": {"inputs": [[[1.5]]], "params": {"weight": [[0.25], [0.5], [2.0]]}},
        "a.o_proj": {"inputs": [[[0.09375]]], "outputs": [[[3.0]], [[4.0]]]},
        "a.sdpa": {"inputs": [[[1.0]], [[2.0]], [[3.0]]], "outputs": [[[[1.0, 2.0]]]]},
    },
}


def _numpy_savez(obj) -> bytes:
    holder = np.empty((), dtype=object)
    holder[()] = obj
    buffer = io.BytesIO()
    np.savez(buffer, holder)
    return buffer.getvalue()


def test_numpy_reads_what_we_write(tmp_path):
    path = npz.save(tmp_path / "s.npz", STATS)
    loaded = np.load(path, allow_pickle=True)["arr_0"].item()
    weight = loaded["Nodes"]["a.qkv_proj"]["params"]["weight"]
    assert weight.dtype == np.float32 and weight.shape == (3, 1)
    assert loaded["Nodes"]["a.sdpa"]["outputs"][0].shape == (1, 1, 2)
    assert loaded["LocalRank"] == 3 and loaded["GlobalRank"] is None
    assert npz.load(path) == STATS


def test_we_read_what_numpy_writes_including_scalars(tmp_path):
    arrays = {
        "Nodes": {
            "m": {
                "inputs": [np.array([[1.5]], dtype=np.float32), np.float32(0.5), np.array(0.25, dtype=np.float64)],
                "params": {"weight": np.array([[1.0], [2.0]], dtype=np.float32)},
            }
        }
    }
    (tmp_path / "n.npz").write_bytes(_numpy_savez(arrays))
    assert npz.load(tmp_path / "n.npz") == {
        "Nodes": {"m": {"inputs": [[[1.5]], 0.5, 0.25], "params": {"weight": [[1.0], [2.0]]}}}
    }


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_hooks_maxabs_0_1.npz"
    path.write_bytes(_numpy_savez({"Nodes": {"x": {"inputs": [_Exploit(marker)]}}}))
    with pytest.raises(MeasurementError, match=r"evil_hooks_maxabs_0_1\.npz.*(posix|os)\.system"):
        npz.load(path)
    assert not marker.exists()
    # the same payload does run under plain pickle: the test would catch an allow-list that lets it through
    raw = zipfile.ZipFile(path).read("arr_0.npy")
    pickle.loads(raw[raw.index(b"\n") + 1 :])
    assert marker.exists()


def test_not_an_npz_and_plain_arrays_are_refused(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(MeasurementError, match="junk.npz: is not a readable INC NPZ"):
        npz.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "plain.npz", np.ones(3))
    with pytest.raises(MeasurementError, match="not INC's object array"):
        npz.load(tmp_path / "plain.npz")


def _as_arrays(stats: dict) -> dict:
    """INC's in-memory form: float32 arrays at the leaves, field names shared (they are code literals)."""

    def node(fields):
        return {
            name: (
                {key: np.array(leaf, dtype=np.float32) for key, leaf in value.items()}
                if name == "params"
                else [np.array(leaf, dtype=np.float32) for leaf in value]
            )
            for name, value in fields.items()
        }

    return {**stats, "Nodes": {module: node(fields) for module, fields in stats["Nodes"].items()}}


def _numpy1_npz(stats: dict) -> bytes:
    """What numpy 1.x's np.savez writes (a protocol-3 pickle; numpy 2.x uses 4); module spelled numpy._core here."""
    holder = np.empty((), dtype=object)
    holder[()] = _as_arrays(stats)
    header = npz.image({})[: npz.image({}).index(b"\n") + 1]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("arr_0.npy", header + pickle.dumps(holder, protocol=3))
    return buffer.getvalue()


@pytest.mark.parametrize("node_count", [3, 1000, 1301])  # exactly one SETITEMS batch is a pickler edge case
def test_we_write_numpys_pickle_byte_for_byte(tmp_path, node_count):
    nodes = {
        f"model.layers.{i}.mlp": {
            "inputs": [[[i + 0.5]]],
            "params": {"weight": [[0.25], [float(i)]] if i % 3 else [[float(i)]]},
        }
        for i in range(node_count)
    }  # per-channel and (most common) per-tensor weights
    nodes["model.layers.0.moe_op"] = {"inputs": [[[1.0]]], "outputs": [[[2.0]]] * 1002 + [[[[1.0, 2.0]]]]}
    stats = {"GlobalRank": None, "LocalRank": 300, "Mode": "DynamicRange", "NumSamples": 7, "Nodes": nodes}
    (tmp_path / "n.npz").write_bytes(_numpy1_npz(stats))
    assert zipfile.ZipFile(tmp_path / "n.npz").read("arr_0.npy") == npz.image(stats, core="numpy._core.multiarray")


def test_holds_proves_equality_by_bytes_and_falls_back_otherwise(tmp_path):
    path = npz.save(tmp_path / "s.npz", STATS)
    assert npz.holds(path, STATS)
    changed = json.loads(json.dumps(STATS))
    changed["Nodes"]["a.o_proj"]["inputs"] = [[[0.1]]]
    assert not npz.holds(path, changed)
    (tmp_path / "n.npz").write_bytes(_numpy1_npz(STATS))
    assert npz.holds(tmp_path / "n.npz", STATS)
    (tmp_path / "numpy2.npz").write_bytes(_numpy_savez(_as_arrays(STATS)))  # protocol 4: decoded instead
    assert not npz.holds(tmp_path / "numpy2.npz", STATS) and npz.load(tmp_path / "numpy2.npz") == STATS
    assert not npz.holds(tmp_path / "missing.npz", STATS)


def _scale_arrays(stats: dict) -> dict:
    """INC's in-memory scale file: each leaf a float32 array (0-d for a float), containers as they are."""

    def leaf(value):
        if isinstance(value, dict):  # per-channel weight {0: ..., 1: ...}
            return {key: leaf(item) for key, item in value.items()}
        return np.array(value, dtype=np.float32)

    def node(fields):
        return {
            name: (
                {key: leaf(v) for key, v in value.items()} if name == "params" else type(value)(leaf(v) for v in value)
            )
            for name, value in fields.items()
        }

    return {**stats, "Nodes": {module: node(fields) for module, fields in stats["Nodes"].items()}}


@pytest.mark.parametrize("node_count", [2, 300])  # past 256 memo entries the pickler switches to 4-byte puts
def test_scale_files_0d_arrays_tuples_and_int_keys_are_numpys_pickle(tmp_path, node_count):
    nodes = {}
    for i in range(node_count):
        nodes[f"m.{i}.qkv_proj"] = {"inputs": [0.5 + i], "outputs": (0.25,), "params": {"weight": 2.0 ** -(i % 40)}}
        nodes[f"m.{i}.k_cache"] = {"inputs": [0.125], "outputs": [0.125], "params": {}}
        nodes[f"m.{i}.fused_sdpa"] = {"inputs": [1.0, 2.0, 3.0, 4.0], "outputs": (0.5,), "params": {}}
        nodes[f"m.{i}.softmax"] = {"inputs": (), "outputs": (0.5,), "params": {}}
        nodes[f"m.{i}.o_proj"] = {"inputs": [1.0], "outputs": (0.5, 0.25), "params": {"weight": 1.0}}
        nodes[f"m.{i}.many"] = {"inputs": [1.0], "outputs": (0.5, 0.25, 1.0, 2.0, 4.0), "params": {}}
        nodes[f"m.{i}.pcs"] = {
            "inputs": [0.5],
            "outputs": ([0.5, 0.25, 1.0],),
            "params": {"weight": {0: [1.0, 0.5, 2.0], 1: [1.0] * 5}},
        }
        nodes[f"m.{i}.embed"] = {"inputs": (), "outputs": (), "params": {"weight": [0.5]}}
    stats = {"GlobalRank": None, "LocalRank": 1, "Mode": "Scale", "Nodes": nodes}
    holder = np.empty((), dtype=object)
    holder[()] = _scale_arrays(stats)
    image = npz.image(stats, core="numpy._core.multiarray")
    assert image[image.index(b"\n") + 1 :] == pickle.dumps(holder, protocol=3)
    path = npz.save(tmp_path / "s.npz", stats)
    assert npz.load(path) == stats  # tuples stay tuples, int keys stay ints, 0-d arrays come back as floats
    assert npz.holds(path, stats)
    loaded = np.load(path, allow_pickle=True)["arr_0"].item()["Nodes"]["m.0.pcs"]
    assert loaded["params"]["weight"][1].shape == (5,) and loaded["outputs"][0].dtype == np.float32
