"""Our scale files against INC's own code (neural-compressor-pt in the venv), for every op type.

1. Reference: INC's op quantizers (`ops_quantizer.get_op_quantizer(...).get_scales_module_config()`) run on
   CPU on the range file (read by INC's `load_file`) and the real weights compute the scale ModuleConfigs
   that INC's QUANTIZE saves. One HPU behaviour is put back in: a bf16 tensor divided by a Python float is
   `x * bf16(1 / c)` in the HPU graph, while CPU torch divides in float32 (`inc.arith` explains it).
   For the opt-weight methods also: the weight's move to "hpu" is a no-op, the HPU's saturating FP8 cast
   (`cast_to_fp8_v2`) is a clamp to the device's range plus torch's cast, and maxabs_hw_opt_weight's
   candidates are the device's HW scales (INC reads them from the accelerator, which is the CPU here).
   Everything else (log2 in bf16, pow2/HW rounding, products, the MSE searches, layouts) is INC's code as
   installed. Our NPZ must be the pickle of INC's objects byte for byte.
2. Loader: INC's `load_scales` + `convert_scales_to_tensors_dict` + each op quantizer's
   `scales_module_config_to_q_and_dq` (what QUANTIZE does with an existing scale file) accept our files and
   end up with our scales. Only the HPU cast kernels are stubbed: QuantInput/DequantOutput look them up
   when built (they are never called here).
"""

from __future__ import annotations

import copy
import pickle
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest

from ray_calib.inc import MODE_SCALE, MeasurementSet, RankFile, StatsName, npz, write_rank_file
from ray_calib.inc.devices import DEVICES
from ray_calib.scales.files import ScaleRequest, make_scales
from tests.scales import every_op

torch = pytest.importorskip("torch")
fp8 = pytest.importorskip("neural_compressor.torch.algorithms.fp8_quant")

from neural_compressor.torch.algorithms.fp8_quant._core import common as inc_common  # noqa: E402
from neural_compressor.torch.algorithms.fp8_quant._core import fp_utils  # noqa: E402
from neural_compressor.torch.algorithms.fp8_quant._core.quantized_func_wrappers import (  # noqa: E402
    quantized_func_wrapper as inc_wrappers,
)
from neural_compressor.torch.algorithms.fp8_quant._core.scale_methods import (  # noqa: E402
    ops_quantizer,
    scales_method,
)
from neural_compressor.torch.algorithms.fp8_quant._core.scale_methods.scale_method_config import (  # noqa: E402
    CfgStr,
    ScaleMethodString,
    scale_method_config_mapping,
)
from neural_compressor.torch.algorithms.fp8_quant._quant_common.quant_config import ScaleFormat  # noqa: E402
from neural_compressor.torch.utils.auto_accelerator import INCAcceleratorType  # noqa: E402

GAUDI = {"gaudi2": INCAcceleratorType.GAUDI2, "gaudi3": INCAcceleratorType.GAUDI3}
CASES = [  # (method, device, device_for_scales, fp8 format, weights from checkpoint, backoffs)
    ("maxabs_hw", "gaudi3", None, "E4M3", False, None),
    ("maxabs_hw", "gaudi2", None, "E4M3", True, None),
    ("maxabs_hw", "gaudi3", "gaudi2", "E4M3", False, None),
    ("maxabs_hw", "gaudi3", None, "E5M2", False, None),
    ("maxabs_pow2", "gaudi3", None, "E4M3", True, None),
    ("maxabs_pow2", "gaudi2", None, "E4M3", False, (0.5, 0.125)),
    ("maxabs_arbitrary", "gaudi3", None, "E4M3", False, None),
    ("maxabs_arbitrary", "gaudi2", None, "E4M3", True, None),
    ("unit_scale", "gaudi3", None, "E4M3", False, None),
    ("hw_aligned_single_scale", "gaudi2", None, "E4M3", False, None),
    ("hw_aligned_single_scale", "gaudi3", None, "E4M3", False, None),
    ("act_maxabs_hw_weights_pcs_maxabs_pow2", "gaudi3", None, "E4M3", True, None),
    ("act_maxabs_pow2_weights_pcs_maxabs_pow2", "gaudi2", None, "E4M3", True, None),
    ("maxabs_hw_opt_weight", "gaudi3", None, "E4M3", True, None),
    ("maxabs_hw_opt_weight", "gaudi2", None, "E4M3", True, None),
    ("maxabs_pow2_opt_weight", "gaudi3", None, "E4M3", True, None),
    ("act_maxabs_hw_weights_pcs_opt_pow2", "gaudi3", None, "E4M3", True, None),
    ("act_maxabs_pow2_weights_pcs_opt_pow2", "gaudi2", None, "E4M3", True, None),
]


@pytest.fixture(scope="module")
def every(tmp_path_factory):
    return every_op.build(tmp_path_factory.mktemp("every-op"))


@pytest.fixture(scope="module")
def hpu_division():
    """INC's calc_scale_from_maxabs with the HPU's bf16 semantics (multiply by the bf16 reciprocal)."""

    def calc_scale_from_maxabs(xmaxabs, fullscale, backoff=1):
        return xmaxabs * torch.tensor(1.0 / (fullscale * backoff)).to(xmaxabs.dtype)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scales_method, "calc_scale_from_maxabs", calc_scale_from_maxabs)
        yield


class OnHpu(torch.Tensor):
    """A weight whose `.to("hpu")` (INC's mmse_scale moves the weight there) stays on the CPU."""

    def to(self, *args, **kwargs):
        if args and args[0] == "hpu":
            return self.as_subclass(torch.Tensor)
        return super().to(*args, **kwargs)


def _hpu_fp8_cast(fullscale: float):
    def cast_to_fp8(x, dtype, scale_inv=None):  # the HPU cast saturates at the device's largest value
        return x.clamp(-fullscale, fullscale).to(dtype)

    return cast_to_fp8


def _hqt(device_for_scales: str, *, use_qdq: bool = False, per_channel: bool = False) -> SimpleNamespace:
    """The parsed QUANT_CONFIG a patched module carries (INC turns scale_format SCALAR into CONST for pcs)."""
    classes = {cls: kind for cls, kind, _ in every_op_classes()}
    return SimpleNamespace(
        cfg={
            "mod_dict": classes,
            "scale_format": ScaleFormat.CONST if per_channel else ScaleFormat.SCALAR,
            "use_qdq": use_qdq,
            "fake_quant": False,
            "dynamic_quantization": False,
            "device_for_scales": GAUDI[device_for_scales],
            "row_parallel_linear_allreduce_quantization": False,
        }
    )


def every_op_classes():
    return [
        ("Linear", "linear", None),
        ("QKVParallelLinear", "linear", None),
        ("RowParallelLinear", "row_parallel_linear", None),
        ("MergedColumnParallelLinear", "linear", None),
        ("MoeMatmul", "linear", None),
        ("Matmul", "matmul", None),
        ("B2BMatmul", "b2b_matmul", None),
        ("VLLMKVCache", "kv_cache", None),
        ("ModuleFusedSDPA", "fused_sdpa", None),
        ("BlockSoftmaxConstMax", "softmax", None),
        ("VllmMixtureOfExpertsOp", "dynamic_moe", None),
        ("EmbeddingBag", "embedding", None),
    ]


def _method_config(method: str, backoffs, device: str = "gaudi3") -> dict:
    configs = scale_method_config_mapping[ScaleMethodString[method.upper()]]
    config = {
        CfgStr.ACTIVATION: copy.copy(configs[CfgStr.ACTIVATION]),
        CfgStr.WEIGHT: copy.copy(configs[CfgStr.WEIGHT]),
    }
    if method == "maxabs_hw_opt_weight":
        config[CfgStr.WEIGHT].params = {"weight_scales": list(DEVICES[device].hw_scales)}
    if backoffs:  # INC >= 3.5: a dict-form scale_method with "backoff" is the only way to change them
        config[CfgStr.ACTIVATION].backoff, config[CfgStr.WEIGHT].backoff = backoffs
    return config


def _module(name: str, every, hqt, experts: int = every_op.EXPERTS) -> torch.nn.Module:
    _, kind, weight = every.modules[name]
    mod = torch.nn.Module()
    mod.__hqt_config__ = hqt
    if weight is not None:
        mod.weight = torch.nn.Parameter(weight, requires_grad=False)
    if kind == "dynamic_moe":
        mod.local_num_experts = experts
    return mod


def inc_scale_stats(every: every_op.EveryOp, method: str, device_for_scales: str, fp8_format: str, backoffs) -> dict:
    """What INC's QUANTIZE would save for our range file: {"GlobalRank", "LocalRank", "Mode", "Nodes"}."""
    range_npz = every.range_dir / f"{every_op.PREFIX}_hooks_maxabs_0_1.npz"
    measurement = inc_common.load_file(str(range_npz), np.ndarray, False)
    params = {
        "lp_dtype": getattr(torch, f"float8_{fp8_format.lower()}" + ("fn" if fp8_format == "E4M3" else "")),
        "hp_dtype": torch.bfloat16,
    }
    config, hqt = _method_config(method, backoffs, device_for_scales), _hqt(device_for_scales)
    nodes = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fp_utils, "cast_to_fp8_fcn", _hpu_fp8_cast(DEVICES[device_for_scales].fullscale))
        for name, (cls, _, _) in every.modules.items():
            module = _module(name, every, hqt)
            if "weight" in module._parameters:
                module.weight = torch.nn.Parameter(module.weight.as_subclass(OnHpu), requires_grad=False)
            quantizer = ops_quantizer.get_op_quantizer(config, module, measurement[name], params, cls)
            scales = quantizer.get_scales_module_config()
            nodes[name] = inc_common.format_functions_rec((torch.Tensor, np.ndarray))(scales.__dict__)
    return {"GlobalRank": None, "LocalRank": 0, "Mode": "Scale", "Nodes": nodes}


def _ours(every, tmp_path, method, device, device_for, fp8_format, weights, backoffs):
    request = ScaleRequest(
        in_dir=every.range_dir,
        out_dir=tmp_path,
        method=method,
        device=device,
        device_for=device_for,
        fp8_format=fp8_format,
        weights_dir=every.model_dir if weights else None,
        input_backoff=backoffs[0] if backoffs else None,
        weight_backoff=backoffs[1] if backoffs else None,
    )
    run = make_scales(request)
    return tmp_path / f"{every_op.PREFIX}_hooks_maxabs_{run.method.file_tag}_0_1.npz"


@pytest.mark.parametrize(("method", "device", "device_for", "fp8_format", "weights", "backoffs"), CASES)
def test_our_npz_is_incs_pickle_byte_for_byte(
    every, hpu_division, tmp_path, method, device, device_for, fp8_format, weights, backoffs
):
    ours = _ours(every, tmp_path, method, device, device_for, fp8_format, weights, backoffs)
    inc = inc_scale_stats(every, method, device_for or device, fp8_format, backoffs)
    holder = np.empty((), dtype=object)
    holder[()] = inc
    inc_pickle = pickle.dumps(holder, protocol=3)  # numpy 1.x's np.savez pickle (module spelled numpy._core here)
    stats = MeasurementSet.discover(tmp_path, method=ours.name.split("_hooks_maxabs_")[1].rsplit("_0_1")[0]).read(0)
    image = npz.image(stats.to_stats(), core="numpy._core.multiarray")
    body = image[image.index(b"\n") + 1 :]
    if body != inc_pickle:  # name the first node that differs, by value
        loaded = npz.load(ours)["Nodes"]
        for name, node in inc["Nodes"].items():
            assert _plain(loaded[name]) == _plain(node), name
    assert body == inc_pickle
    assert ours.exists() and not (tmp_path / ours.name.replace(".npz", "_mod_list.json")).exists()


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return np.asarray(value, dtype=np.float32).tolist()


@pytest.fixture
def stub_hpu_kernels(monkeypatch):
    """QuantInput/DequantOutput look up the HPU cast kernel when built; give them an inert one."""

    class Kernel:
        def __init__(self, scale_format, is_dynamic=False):
            pass

    factory = inc_wrappers.QuantizedFuncWrapperFactory
    monkeypatch.setattr(
        factory,
        "_QuantizedFuncWrapperFactory__device_func_wrappers_mapping",
        {op: Kernel for op in inc_wrappers.OP_TYPE},
    )
    monkeypatch.setattr(factory, "_QuantizedFuncWrapperFactory__quantized_func_wrapper_instances", {})


def _same(a, b) -> bool:
    """A registered scale (a float with scale_format SCALAR, else a tensor) equals the loaded one."""
    return torch.equal(torch.as_tensor(a, dtype=torch.float32).flatten(), torch.as_tensor(b).float().flatten())


def inc_loads(every, path, method: str, device: str, experts: int = every_op.EXPERTS) -> dict[str, str]:
    """Run QUANTIZE's scale-file path on `path`; return each node's op type once configured."""
    loaded = inc_common.load_scales(str(path), np.ndarray)
    scales = inc_common.convert_scales_to_tensors_dict(loaded, np.ndarray, torch.bfloat16, device="cpu")
    config = _method_config(method, None)
    params = {"lp_dtype": torch.float8_e4m3fn, "hp_dtype": torch.bfloat16}
    configured = {}
    for name, module_scales in scales.items():
        cls, kind, _ = every.modules[name]
        hqt = _hqt(
            device,
            use_qdq=kind == "embedding",  # INC's embedding quantizer has only the QDQ path
            per_channel="pcs" in method,
        )
        quantizer = ops_quantizer.get_op_quantizer(config, _module(name, every, hqt, experts), None, params, cls)
        q_dq = quantizer.scales_module_config_to_q_and_dq(module_scales)
        for scale, quant in zip(module_scales.inputs, q_dq.inputs):
            assert _same(quant.scale_inv, torch.reciprocal(scale)), name
        if kind == "kv_cache":  # the KV output is dequantized with the input scale
            assert _same(q_dq.outputs[0].scale, module_scales.inputs[0]), name
        if kind in ("fused_sdpa", "softmax"):
            assert _same(q_dq.outputs[0].scale, module_scales.outputs[0]), name
        configured[name] = kind
    return configured


@pytest.mark.parametrize(
    ("method", "device", "weights"),
    [
        ("maxabs_hw", "gaudi3", False),
        ("maxabs_hw", "gaudi2", False),
        ("maxabs_pow2", "gaudi3", False),
        ("maxabs_arbitrary", "gaudi2", False),
        ("unit_scale", "gaudi3", False),
        ("hw_aligned_single_scale", "gaudi2", False),
        ("act_maxabs_hw_weights_pcs_maxabs_pow2", "gaudi3", True),
        ("act_maxabs_pow2_weights_pcs_opt_pow2", "gaudi2", True),
        ("maxabs_hw_opt_weight", "gaudi3", True),
        ("maxabs_pow2_opt_weight", "gaudi2", True),
    ],
)
def test_inc_loader_takes_our_files_for_every_op_type(every, stub_hpu_kernels, tmp_path, method, device, weights):
    path = _ours(every, tmp_path, method, device, None, "E4M3", weights, None)
    configured = inc_loads(every, path, method, device)
    assert set(configured.values()) == {kind for _, kind, _ in every.modules.values()}
    assert len(configured) == len(every.modules)


def test_inc_loader_fails_on_the_old_layouts(every, stub_hpu_kernels, tmp_path):
    """Without `outputs` on KV nodes INC's loader raises; a 3-input / 2-output fused SDPA fails when configured."""
    good = MeasurementSet.discover(
        _ours(every, tmp_path, "maxabs_hw", "gaudi3", None, "E4M3", False, None).parent, method="MAXABS_HW"
    ).read(0)
    kv = every_op.IMPL.format(i=0) + ".k_cache"
    sdpa = every_op.IMPL.format(i=0) + ".fused_scaled_dot_product_attention"
    for broken, error in (
        ({kv: {"inputs": good.nodes[kv]["inputs"]}}, RuntimeError),
        ({sdpa: {"inputs": list(good.nodes[sdpa]["inputs"][:3]), "outputs": [0.5, 0.25]}}, IndexError),
    ):
        out = tmp_path / "old"
        write_rank_file(RankFile(name=good.name, nodes={**good.nodes, **broken}, mode=MODE_SCALE), out)
        with pytest.raises(error):
            inc_loads(every, out / f"{good.name.stem}.npz", "maxabs_hw", "gaudi3")


def test_inc_fails_on_allreduce_quantization_so_we_refuse_it(every):
    """INC 3.9+ raises AttributeError for row_parallel_linear_allreduce_quantization: `scales --allreduce-quantization`
    is refused for those versions rather than writing files no INC can produce."""
    from ray_calib.errors import ConfigError

    hqt = _hqt("gaudi3")
    hqt.cfg["row_parallel_linear_allreduce_quantization"] = True
    name = every_op.ATTN.format(i=0) + ".o_proj"
    with pytest.raises(AttributeError, match="output_scale_method_config"):
        ops_quantizer.get_op_quantizer(
            _method_config("maxabs_hw", None),
            _module(name, every, hqt),
            None,
            {"lp_dtype": torch.float8_e4m3fn, "hp_dtype": torch.bfloat16},
            "RowParallelLinear",
        )
    with pytest.raises(ConfigError, match="AttributeError"):
        make_scales(
            ScaleRequest(
                in_dir=every.range_dir,
                out_dir=every.range_dir.parent / "x",
                method="maxabs_hw",
                device="gaudi3",
                allreduce_quantization=True,
            )
        )


def test_inc_own_scale_npz_loads_through_our_reader_unchanged():
    """The stats INC pickled above decode through our allow-list reader (0-d arrays, tuples, int keys)."""
    stats = {
        "GlobalRank": None,
        "LocalRank": 0,
        "Mode": "Scale",
        "Nodes": {
            "a": {
                "inputs": [np.array(0.5, dtype=np.float32)],
                "outputs": (np.array(0.25, dtype=np.float32),),
                "params": {"weight": {0: np.array([0.5, 2.0], dtype=np.float32), 1: np.ones(3, dtype=np.float32)}},
            },
            "b": {"inputs": (), "outputs": (np.array(1.0, dtype=np.float32),), "params": {}},
        },
    }
    holder = np.empty((), dtype=object)
    holder[()] = stats
    header = npz.image({})[: npz.image({}).index(b"\n") + 1]
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("arr_0.npy", header + pickle.dumps(holder, protocol=3))
    path = StatsName("p", method="MAXABS_HW").file(".", ".npz")
    loaded = npz.load(_write(buffer.getvalue(), path))
    assert loaded["Nodes"]["a"] == {
        "inputs": [0.5],
        "outputs": (0.25,),
        "params": {"weight": {0: [0.5, 2.0], 1: [1.0, 1.0, 1.0]}},
    }
    assert loaded["Nodes"]["b"] == {"inputs": (), "outputs": (1.0,), "params": {}}
    assert npz.image(loaded, core="numpy._core.multiarray").endswith(pickle.dumps(holder, protocol=3))


def _write(data: bytes, path):
    import tempfile
    from pathlib import Path

    target = Path(tempfile.mkdtemp()) / path.name
    target.write_bytes(data)
    return target


@pytest.mark.fixtures
def test_inc_loader_takes_our_files_of_a_real_expert_parallel_moe_run(stub_hpu_kernels, tmp_path):
    """DeepSeek-R1 on Gaudi2 at TP16/EP16 (range files only): MLA latent cache, fused SDPA, 16 local experts."""
    from ray_calib.inc.optypes import op_type
    from tests.conftest import DS_R1_TP16, fixture_dir

    run = make_scales(
        ScaleRequest(in_dir=fixture_dir(DS_R1_TP16), out_dir=tmp_path, method="maxabs_hw", device="gaudi2")
    )
    assert run.ranks == 16
    ranges = MeasurementSet.discover(DS_R1_TP16).read(5)
    classes = {
        "linear": "Linear",
        "matmul": "Matmul",
        "b2b_matmul": "B2BMatmul",
        "kv_cache": "VLLMKVCache",
        "fused_sdpa": "ModuleFusedSDPA",
        "dynamic_moe": "VllmMixtureOfExpertsOp",
    }
    ops = frozenset(name.split(".w13_list.")[0] for name in ranges.nodes if ".w13_list." in name)
    modules = {
        name: (classes[kind], kind, None) for name, node in ranges.nodes.items() for kind in [op_type(name, node, ops)]
    }
    configured = inc_loads(
        SimpleNamespace(modules=modules),
        tmp_path / "inc_measure_output_hooks_maxabs_MAXABS_HW_5_16.npz",
        "maxabs_hw",
        "gaudi2",
        experts=16,
    )
    assert len(configured) == len(ranges.nodes) == 2707
    assert set(configured.values()) == set(classes)
