"""A full disk during `quantize`, on a real small tmpfs: the error names the shard and the bytes still needed,
nothing half-written stays, and the next run removes (or, elsewhere in the run, names) what a kill left."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("torch")

from ray_calib import atomic  # noqa: E402
from ray_calib.convert.pipeline import QuantizeRequest, quantize_run  # noqa: E402
from ray_calib.errors import DiskFullError, ModelError  # noqa: E402
from ray_calib.model.checkpoint import Checkpoint  # noqa: E402
from ray_calib.rundir import RunDir  # noqa: E402
from tests.convert.synthetic import write_measurements  # noqa: E402


@contextlib.contextmanager
def small_disk(size: str):
    """A tmpfs of `size` mounted on a fresh directory (root only), unmounted afterwards."""
    mount = Path(tempfile.mkdtemp(prefix="rc-small-disk-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
        mount.rmdir()


def quantize(root: Path, model: Path, **options):
    if not (root / "run" / "measure").exists():
        write_measurements(root / "run" / "measure", model, world_size=1)
    options = {"fp8_kv": False, **options}  # the synthetic meta says FP8 KV: one model shard here, no k/v shard
    return quantize_run(QuantizeRequest(run=RunDir.resolve(root / "run"), model=model, **options))


def test_disk_full_mid_write_names_the_shard_and_bytes_and_leaves_nothing(tiny_llama):
    with small_disk("2m") as disk:
        # the pre-check is told there is room, as when another writer fills the disk meanwhile
        with pytest.raises(DiskFullError) as err:
            quantize(disk, tiny_llama, free_space=lambda path: 1 << 40)
        out = disk / "run" / "fp8"
        message = str(err.value)
        assert message.startswith(f"{out / 'model.safetensors'}: no space left on device (")
        assert "MB more needed to finish it" in message and "rerun the same command" in message
        assert err.value.needed > 0 and err.value.free is not None and err.value.free < 1 << 20
        assert atomic.leftovers(out) == [] and not (out / "model.safetensors").exists()


def test_the_next_run_removes_a_killed_runs_partial_shard(tiny_llama, capsys):
    with small_disk("80m") as disk:
        out = disk / "run" / "fp8"
        out.mkdir(parents=True)
        partial = out / ".model.safetensors.k1ll3d.tmp"  # what SIGKILL during the write leaves
        with open(partial, "wb") as handle:
            handle.write(os.urandom(70 << 20))
        summary = quantize(disk, tiny_llama).summary
        assert summary is not None and not partial.exists() and atomic.leftovers(out) == []
        note = f"removed 1 temporary file(s) (73.4 MB) an interrupted earlier run left in {out}"
        assert note in capsys.readouterr().err
        assert summary.shards_written == ["model.safetensors"] and Checkpoint.open(out).shards == ["model.safetensors"]


def test_the_free_space_check_names_our_leftovers_elsewhere_in_the_run(tiny_llama):
    with small_disk("80m") as disk:
        other = disk / "run" / "fp8-old"
        other.mkdir(parents=True)
        (other / ".model.safetensors.k1ll3d.tmp").write_bytes(os.urandom(70 << 20))
        with pytest.raises(ModelError) as err:
            quantize(disk, tiny_llama, out=disk / "run" / "fp8-new")
        message = str(err.value)
        assert "73.4 MB of the disk is 1 temporary file(s) left by interrupted ray-calib runs" in message
        assert str(other / ".model.safetensors.k1ll3d.tmp") in message and "nothing was written" in message
        assert (other / ".model.safetensors.k1ll3d.tmp").exists(), "another run's files are named, not deleted"


def test_small_writes_name_the_file_too(tmp_path):
    with small_disk("64k") as disk:
        target = disk / "eval.json"
        with pytest.raises(DiskFullError, match=rf"^{target}: no space left on device \(0.1 MB more needed"):
            atomic.write_bytes(target, b"x" * 100_000)
        assert list(disk.iterdir()) == []
