"""The Gaudi INC backend of `measure`, run end to end against a fake vllm-gaudi, a fake Ray and a fake INC.

What the fakes hold the code to, each taken from how vllm-gaudi / INC / Ray behave:

- vllm-gaudi prepares INC on the raw model only when QUANT_CONFIG is in the rank's env at start, and
  then wraps that model in an adapter without attribute forwarding (`HpuModelAdapter`); its
  `shutdown_inc()` finalizes `self.model.model` once per process.
- INC's `finalize_calibration(model)` raises NotImplementedError unless `model.__hqt_config__` exists,
  and writes `<measure_file>.json` / `_mod_list.json` named with the rank and world size.
- Ray ranks get the env of the job's runtime_env, which vLLM copies from the driver's first
  `ray.init`; per-node tasks run where they are placed.
- A Gaudi card opened by the CLI is lost to a rank: the driver must never import habana's device API.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from ray_calib.errors import EngineError
from ray_calib.inc import MeasurementSet, read_coverage, read_meta
from tests.engine.test_hlsmi import fake_hl_smi


class FakeRay(types.ModuleType):
    def __init__(self, devices: int) -> None:
        super().__init__("ray")
        self.calls: list[tuple] = []
        self.runtime_env: dict | None = None
        self.devices = devices
        self.util = types.ModuleType("ray.util")
        self.util.get_node_ip_address = lambda: "10.0.0.1"
        strategies = types.ModuleType("ray.util.scheduling_strategies")
        strategies.NodeAffinitySchedulingStrategy = lambda node, soft: ("affinity", node, soft)
        self.util.scheduling_strategies = strategies

    def init(self, address=None, runtime_env=None, log_to_driver=True):
        self.calls.append(("init", address))
        self.runtime_env = runtime_env

    def shutdown(self) -> None:
        self.calls.append(("shutdown",))
        self.runtime_env = None

    def is_initialized(self) -> bool:
        return self.runtime_env is not None

    def get_runtime_context(self):
        return SimpleNamespace(runtime_env=self.runtime_env)

    def cluster_resources(self):
        return {"HPU": float(self.devices)}

    def nodes(self):
        return [{"NodeID": "head", "Alive": True}, {"NodeID": "worker1", "Alive": True}]

    def remote(self, **resources):
        ray = self

        class Remote:
            def __init__(self, function):
                self.function = function

            def options(self, scheduling_strategy=None):
                return SimpleNamespace(remote=lambda *args: ray._task(self.function, scheduling_strategy, args))

        return Remote

    def _task(self, function, where, args):
        assert self.is_initialized(), "a Ray task before ray.init: the job would run without the run's env"
        self.calls.append(("task", function.__name__, where[1]))
        return function(*args)

    def get(self, refs, timeout=None):
        return refs


class HpuModelAdapter:
    """vllm-gaudi's wrapper: holds the raw model in `.model`, forwards no attributes."""

    def __init__(self, model):
        self.model = model


class RawModel:
    pass


class FakeRunner:
    """vllm-gaudi's model runner as far as INC goes: prepare at load, adapter, shutdown_inc once."""

    shutdown_called = False  # vllm-gaudi keeps this flag per process (a module global)

    def __init__(self, rank: int, world: int, env: dict, experts: int) -> None:
        self.rank, self.world, self.experts, self.finalized = rank, world, experts, 0
        raw = RawModel()
        raw.stats = {}
        path = env.get("QUANT_CONFIG")
        if path:
            config = json.loads(Path(path).read_text())  # must exist on this rank's node before vLLM starts
            assert config["mode"] == "MEASURE"
            raw.__hqt_config__ = SimpleNamespace(
                cfg={"measure_file": f"{config['dump_stats_path']}_hooks_maxabs_{rank}_{world}", **config}
            )
        self.model = HpuModelAdapter(raw)

    def observe(self, requests: list[dict]) -> None:
        raw, top = self.model.model, max(max(r["prompt_token_ids"]) for r in requests)
        if not hasattr(raw, "__hqt_config__"):
            return
        value = top / 1000 * (self.rank + 1)
        stats = raw.stats
        stats["model.layers.0.self_attn.qkv_proj"] = {
            "inputs": [[[max(value, _get(stats, "qkv"))]]],
            "params": {"weight": [[0.5]]},
        }
        attn = "model.layers.0.self_attn.attn.impl"
        stats[f"{attn}.matmul_qk"] = {"inputs": [[[1.0]], [[0.25]]]}  # K as read back, before step 3
        stats[f"{attn}.k_cache"] = {"inputs": [[[2.0 + self.rank]]]}
        if self.experts:
            op = "model.layers.1.mlp.experts.moe_op"
            # expert k of this rank got tokens only when k is even (so coverage has hits and misses)
            stats[op] = {
                "inputs": [[[1.0]]],
                "outputs": [[[1.0]]] + [[[0.5 if k % 2 == 0 else 0.0]] for k in range(self.experts)],
            }
            for k in range(self.experts):
                stats[f"{op}.w13_list.{k}"] = {"inputs": [[[0.0]]], "params": {"weight": [[0.1]]}}

    def shutdown_inc(self) -> None:
        if FakeRunner.shutdown_called:
            return
        FakeRunner.shutdown_called = True
        sys.modules["neural_compressor.torch.quantization"].finalize_calibration(self.model.model)
        self.finalized += 1


def _get(stats, key):
    node = stats.get("model.layers.0.self_attn.qkv_proj")
    return node["inputs"][0][0][0] if node else 0.0


def fake_finalize(model) -> None:
    """INC's save_calib_result: only the model INC prepared can be saved."""
    if not hasattr(model, "__hqt_config__"):
        raise NotImplementedError("Saving calibration results currently supported only in HPU.")
    base = model.__hqt_config__.cfg["measure_file"]
    rank = int(base.rsplit("_", 2)[1])
    Path(base + ".json").write_text(
        json.dumps({"GlobalRank": None, "LocalRank": rank, "Mode": "DynamicRange", "Nodes": model.stats})
    )
    Path(base + "_mod_list.json").write_text(json.dumps(sorted(model.stats)))
    Path(base + ".npz").write_bytes(b"npz")


class FakeLLM:
    instances: list[FakeLLM] = []

    def __init__(self, **kwargs) -> None:
        from ray_calib.measure.gaudi import IncExtension

        ray = sys.modules["ray"]
        self.kwargs, self.driver_env = kwargs, dict(os.environ)
        job_env = (ray.runtime_env or {}).get("env_vars", {}) if kwargs["distributed_executor_backend"] == "ray" else {}
        self.rank_env = {**job_env}
        world = kwargs["tensor_parallel_size"]
        experts = 0 if not kwargs.get("enable_expert_parallel") else 2
        worker_cls = type("Worker", (IncExtension,), {})
        self.workers = []
        FakeRunner.shutdown_called = False
        for rank in range(world):
            worker = worker_cls()
            worker.model_runner = FakeRunner(rank, world, self.rank_env, experts)
            self.workers.append(worker)
        self.shut_down = False
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self._shutdown))
        FakeLLM.instances.append(self)

    def _shutdown(self):
        self.shut_down = True

    def generate(self, requests, params, use_tqdm=False):
        for worker in self.workers:
            worker.model_runner.observe(requests)
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[7] * params.max_tokens)]) for _ in requests]

    def collective_rpc(self, method, args=()):
        return [getattr(worker, method)(*args) for worker in self.workers]


@pytest.fixture
def gaudi_world(monkeypatch, tmp_path):
    """habana_frameworks 'installed' (importing its device API fails), hl-smi of a Gaudi2, fake Ray/vLLM/INC."""
    saved_env = dict(os.environ)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_hl_smi(bin_dir, "hl-smi-gaudi2.csv")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    for name in ("RAY_CALIB_DEVICE", "RAY_ADDRESS", "VLLM_HOST_IP", "QUANT_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    site = tmp_path / "site" / "habana_frameworks" / "torch"
    site.mkdir(parents=True)
    (site.parent / "__init__.py").write_text("")
    (site / "__init__.py").write_text("raise RuntimeError('habana device API imported in the driver')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    ray = FakeRay(devices=16)
    for name, module in (
        ("ray", ray),
        ("ray.util", ray.util),
        ("ray.util.scheduling_strategies", ray.util.scheduling_strategies),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = lambda max_tokens, temperature: SimpleNamespace(max_tokens=max_tokens)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    for name in ("neural_compressor", "neural_compressor.torch", "neural_compressor.torch.quantization"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["neural_compressor.torch.quantization"].finalize_calibration = fake_finalize
    monkeypatch.setattr("ray_calib.measure.gaudi.NODE_DUMP_ROOT", str(tmp_path / "node-tmp"))
    FakeLLM.instances.clear()
    yield ray
    os.environ.clear()
    os.environ.update(saved_env)


def measure_config(model: Path, dataset: Path, out: Path, tp: int, **extra):
    from ray_calib.measure.run import MeasureConfig

    return MeasureConfig(
        model=str(model),
        dataset=dataset,
        out=out,
        tp_size=tp,
        num_samples=4,
        least_tokens=16,
        batch_size=2,
        chunk_size=2,
        max_new_tokens=3,
        ray_address="10.0.0.1:6379",
        **extra,
    )


def test_dense_model_on_two_nodes(gaudi_world, tiny_models, calib_set, tmp_path):
    from ray_calib.measure.run import run_measure

    out = tmp_path / "measure"
    summary = run_measure(measure_config(tiny_models["llama"], calib_set, out, 2, fp8_kv=True))
    ray, llm = gaudi_world, FakeLLM.instances[0]
    assert "habana_frameworks.torch" not in sys.modules
    # the first Ray call is the job's init, with the env every rank needs; tasks only after it
    assert ray.calls[0] == ("init", "10.0.0.1:6379")
    assert [c[0] for c in ray.calls].count("init") == 1
    env = ray.runtime_env["env_vars"]
    assert env["PT_HPU_WEIGHT_SHARING"] == "0" and env["VLLM_SKIP_WARMUP"] == "true"
    assert env["PT_HPU_ENABLE_LAZY_COLLECTIVES"] == "true"
    assert env["VLLM_ENGINE_READY_TIMEOUT_S"] == env["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] == "1800"
    assert "QUANT_CONFIG" in env["VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"].split(",")
    assert ("task", "node_facts", "head") in ray.calls and ("task", "node_facts", "worker1") in ray.calls
    # the same env reached the ranks (through the runtime_env) and the driver
    assert llm.rank_env["QUANT_CONFIG"] == llm.driver_env["QUANT_CONFIG"] == env["QUANT_CONFIG"]
    # a BF16 KV cache while measuring, although the K/V ranges are recorded (--fp8-kv)
    assert "kv_cache_dtype" not in llm.kwargs
    measure_cfg = json.loads(Path(env["QUANT_CONFIG"]).read_text()) if Path(env["QUANT_CONFIG"]).exists() else None
    assert measure_cfg is None, "the node dump directory (with its QUANT_CONFIG) is removed after the run"
    # BF16 checkpoint -> quantization='inc'; graphs allowed; remote code trusted; dense -> no EP
    assert llm.kwargs["quantization"] == "inc" and llm.kwargs["enforce_eager"] is False
    assert llm.kwargs["trust_remote_code"] is True and "enable_expert_parallel" not in llm.kwargs
    # every rank finalized INC on the raw model (the adapter would have raised), once through shutdown_inc
    assert all(w.model_runner.finalized <= 1 for w in llm.workers) and FakeRunner.shutdown_called
    assert llm.shut_down
    # files gathered to the head, chunks checkpointed, stats cumulative -> max-merge is exact
    assert summary.world_size == 2 and summary.chunks_total == 2
    ranks = MeasurementSet.discover(out).read_all()
    assert [r.rank for r in ranks] == [0, 1]
    qkv = [r.nodes["model.layers.0.self_attn.qkv_proj"]["inputs"][0][0][0] for r in ranks]
    assert qkv[1] == pytest.approx(2 * qkv[0])
    # post-processing (measurements/postprocess.py, upstream's step 3) wrote matmul_qk's K input from the cache
    # input (NPZ rewritten with it)
    attn = "model.layers.0.self_attn.attn.impl"
    assert [r.nodes[f"{attn}.matmul_qk"]["inputs"][1] for r in ranks] == [[[2.0]], [[3.0]]]
    meta = read_meta(out)
    assert (meta.device_type, meta.tp_size, meta.ep_size, meta.fp8_kv) == ("gaudi2", 2, 1, True)
    assert meta.extra["backend"] == "inc" and meta.extra["postprocessed"]["leaves_changed"] == 2
    assert not (tmp_path / "node-tmp").exists() or not any((tmp_path / "node-tmp").iterdir())


def test_moe_model_is_measured_expert_parallel(gaudi_world, tiny_models, calib_set, tmp_path):
    from ray_calib.measure.run import run_measure

    out = tmp_path / "measure"
    run_measure(measure_config(tiny_models["deepseek_v3"], calib_set, out, 2, min_expert_tokens=0))
    llm = FakeLLM.instances[0]
    assert llm.kwargs["enable_expert_parallel"] is True
    assert gaudi_world.runtime_env["env_vars"]["VLLM_EP_SIZE"] == "2"
    assert read_meta(out).ep_size == 2
    coverage = read_coverage(out)
    # two ranks x two local experts; the even local expert of each rank was hit: global 0 and 2
    assert coverage.experts == {"model.layers.1.mlp.experts.moe_op": [1, 0, 1, 0]}
    blocked = json.loads(json.dumps(read_meta(out).to_json()))
    assert blocked["ep_size"] == 2


def test_no_expert_parallel_flag_is_honoured(gaudi_world, tiny_models, calib_set, tmp_path):
    from ray_calib.measure.run import run_measure

    run_measure(measure_config(tiny_models["deepseek_v3"], calib_set, tmp_path / "m", 2, expert_parallel=False))
    assert "enable_expert_parallel" not in FakeLLM.instances[0].kwargs
    assert read_meta(tmp_path / "m").ep_size == 1


def test_resume_and_force_work_on_gaudi_too(gaudi_world, tiny_models, calib_set, tmp_path):
    """A finished chunk survives a crash; --resume starts a fresh engine (fresh INC stats) for the rest."""
    from ray_calib.measure.run import run_measure

    out = tmp_path / "measure"
    original = FakeLLM.generate
    calls = {"n": 0}

    def crash_on_second_chunk(self, requests, params, use_tqdm=False):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("rank 1 died")
        return original(self, requests, params, use_tqdm)

    FakeLLM.generate = crash_on_second_chunk
    try:
        with pytest.raises(EngineError, match="--resume"):
            run_measure(measure_config(tiny_models["llama"], calib_set, out, 2))
    finally:
        FakeLLM.generate = original
    assert FakeLLM.instances[0].shut_down  # the engine is shut down on failure too
    summary = run_measure(measure_config(tiny_models["llama"], calib_set, out, 2, resume=True))
    assert summary.chunks_reused == 1 and summary.chunks_total == 2
    run_measure(measure_config(tiny_models["llama"], calib_set, out, 1, force=True, executor="ray"))
    assert MeasurementSet.discover(out).world_size == 1  # --force removed the TP2 files


def test_rank_without_inc_is_a_clear_error(gaudi_world, tiny_models, calib_set, tmp_path, monkeypatch):
    """QUANT_CONFIG missing from the ranks' env (env not reaching the Ray workers) stops the run at install,
    naming the cause."""
    from ray_calib.measure.run import run_measure

    original = FakeLLM.__init__

    def without_job_env(self, **kwargs):
        sys.modules["ray"].runtime_env = {"env_vars": {}}
        original(self, **kwargs)

    monkeypatch.setattr(FakeLLM, "__init__", without_job_env)
    with pytest.raises(EngineError, match="QUANT_CONFIG"):
        run_measure(measure_config(tiny_models["llama"], calib_set, tmp_path / "m", 2))


def test_hqt_model_unwraps_adapters():
    from ray_calib.measure.gaudi import hqt_model

    raw = RawModel()
    raw.__hqt_config__ = SimpleNamespace(cfg={})
    assert hqt_model(HpuModelAdapter(raw)) is raw
    assert hqt_model(HpuModelAdapter(HpuModelAdapter(raw))) is raw
    assert hqt_model(raw) is raw
    with pytest.raises(EngineError, match="QUANT_CONFIG did not reach the worker"):
        hqt_model(HpuModelAdapter(RawModel()))
