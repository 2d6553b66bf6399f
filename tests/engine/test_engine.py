"""Engine pieces that need no running vLLM: executor choice, worker env, plugins, memory pre-check."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ray_calib.engine.device import GiB
from ray_calib.engine.launch import EngineConfig, engine_settings, llm_kwargs, worker_env
from ray_calib.engine.memory import check_fits, weights_bytes
from ray_calib.engine.plugins import CPU_RAY_ENV, OBSERVE_ENV
from ray_calib.errors import EngineError


@pytest.mark.parametrize(
    "tp,address,want", [(1, None, "uni"), (2, None, "mp"), (1, "h:6390", "ray"), (4, "h:6390", "ray")]
)
def test_executor_follows_tp_and_cluster(tp, address, want):
    config = EngineConfig(model="m", tp_size=tp, ray_address=address)
    assert config.resolved_executor == want
    assert llm_kwargs(config)["distributed_executor_backend"] == (None if want == "uni" else want)


def test_worker_env_on_cpu():
    one = worker_env(EngineConfig(model="m", tp_size=1, kv_cache_gib=2))
    assert one == {}  # the KV size is an engine argument (kv_cache_memory_bytes), not vLLM's whole-GiB variable
    ray = worker_env(EngineConfig(model="m", tp_size=2, ray_address="h:1", observe_weights=True, socket_ifname="eth1"))
    assert ray[CPU_RAY_ENV] == "1" and ray[OBSERVE_ENV] == "1"
    assert ray["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and ray["GLOO_SOCKET_IFNAME"] == "eth1"
    hpu = worker_env(EngineConfig(model="m", device="hpu", tp_size=8, socket_ifname="ens1"))
    assert hpu == {"GLOO_SOCKET_IFNAME": "ens1", "HCCL_SOCKET_IFNAME": "ens1"}


def test_measure_engine_is_eager_without_prefix_cache():
    kwargs = llm_kwargs(EngineConfig(model="m", worker_extension_cls="x.Y"))
    assert kwargs["enforce_eager"] and not kwargs["enable_prefix_caching"] and kwargs["worker_extension_cls"] == "x.Y"


def test_serve_engine_leaves_vllm_defaults_and_sizes_the_cpu_kv_cache():
    serve = EngineConfig(
        model="m", tp_size=8, profile="serve", max_model_len=None, max_num_seqs=None, kv_cache_gib=0.25
    )
    assert engine_settings(serve) == {"tensor_parallel_size": 8, "kv_cache_memory_bytes": GiB // 4}
    cuda = EngineConfig(
        model="m", tp_size=8, device="cuda", profile="serve", max_model_len=-1, max_num_seqs=None, kv_cache_dtype="fp8"
    )
    assert engine_settings(cuda) == {"tensor_parallel_size": 8, "max_model_len": -1, "kv_cache_dtype": "fp8"}
    kwargs = llm_kwargs(cuda)
    assert "enforce_eager" not in kwargs and "enable_prefix_caching" not in kwargs and "dtype" not in kwargs
    with pytest.raises(EngineError, match="unknown engine profile 'fast'"):
        llm_kwargs(EngineConfig(model="m", profile="fast"))


def _plugin(expr: str, env: dict[str, str]) -> str:
    """Run a plugin function in a fresh interpreter (plugins read the env of the process they run in)."""
    code = f"import ray_calib.engine.plugins as p; print({expr})"
    return (
        subprocess.run(
            [sys.executable, "-c", code], env={"PATH": "/usr/bin", **env}, capture_output=True, text=True, check=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )


def test_platform_plugin_applies_only_when_asked():
    assert _plugin("p.cpu_ray_platform()", {}) == "None"
    assert _plugin("p.cpu_ray_platform()", {CPU_RAY_ENV: "1"}) == "ray_calib.engine.cpu_ray.CpuRayPlatform"


@pytest.mark.slow
def test_cpu_ray_platform_has_a_ray_device_key():
    code = (
        "from vllm.platforms import current_platform as c; "
        "print(type(c).__name__, c.ray_device_key, c.get_device_communicator_cls().rsplit('.', 1)[1])"
    )
    env = {"PATH": "/usr/bin", CPU_RAY_ENV: "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "CpuRayPlatform HPU CpuRayCommunicator"
    plain = subprocess.run(
        [sys.executable, "-c", code], env={"PATH": "/usr/bin"}, capture_output=True, text=True, check=True
    ).stdout
    assert plain.strip().splitlines()[-1].split() == ["CpuPlatform", "CpuCommunicator"]


def _safetensors(path, nbytes: int) -> None:
    """A shard of `nbytes` of zero weights (sized from the header; a shorter file is refused as truncated)."""
    header = json.dumps({path.stem: {"dtype": "BF16", "shape": [nbytes // 2], "data_offsets": [0, nbytes]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    os.truncate(path, 8 + len(header) + nbytes)  # sparse: 40 GiB "of weights" costs no disk


def test_weights_from_safetensors_headers(tmp_path):
    _safetensors(tmp_path / "a.safetensors", 4096)
    _safetensors(tmp_path / "b.safetensors", 1024)
    assert weights_bytes(tmp_path) == 5120


def test_weights_estimated_from_config(tmp_path):
    config = {
        "hidden_size": 16384,
        "num_hidden_layers": 126,
        "intermediate_size": 53248,
        "vocab_size": 128256,
        "num_attention_heads": 128,
        "num_key_value_heads": 8,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert 745 * GiB < weights_bytes(tmp_path) < 765 * GiB  # Llama-3.1-405B: 405.8e9 bf16 parameters = 756 GiB


def test_memory_refuses_tp_that_cannot_fit_and_names_the_smallest_that_does(tmp_path):
    _safetensors(tmp_path / "w.safetensors", 40 * GiB)  # 40 GiB of weights on 14 GiB devices
    with pytest.raises(EngineError, match=r"TP 1 needs 41.00 GiB .* use --tp 4") as err:
        check_fits(tmp_path, 1, [1, 2, 4, 8], device="cuda", device_bytes=14 * GiB, kv_bytes=0, devices_per_node=None)
    assert "\n" not in str(err.value)
    assert check_fits(
        tmp_path, 4, [1, 2, 4, 8], device="cuda", device_bytes=14 * GiB, kv_bytes=0, devices_per_node=None
    ).fits


def test_memory_on_cpu_counts_every_rank_of_the_node(tmp_path):
    _safetensors(tmp_path / "w.safetensors", 1024)
    with pytest.raises(EngineError, match=r"TP 8 .* use --tp 1"):
        check_fits(tmp_path, 8, [1, 2, 4, 8], device="cpu", device_bytes=4 * GiB, kv_bytes=GiB, devices_per_node=8)
