"""vllm-gaudi's compressed-tensors loader rules, read from its source (`ops/hpu_compressed_tensors.py`).

The Gaudi checkpoint test checks ray-calib's output against these rules instead of restating them: if the
loader changes what it reads (a parameter name, a dtype, a shape, the config key that disables Gaudi2's
scale adjustment, the kv-scale name mapping), re-reading the new source changes what the test expects.
vllm-gaudi itself cannot be imported here (it needs habana_frameworks), so the file is parsed with `ast`
and small pure pieces (shape expressions, the kv-scale remap function) are evaluated on their own.
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import SHARED

LOADER = SHARED / "reference" / "vllm-gaudi" / "vllm_gaudi" / "ops" / "hpu_compressed_tensors.py"


@dataclass(frozen=True)
class Param:
    name: str
    dtype: str  # torch dtype name, e.g. float8_e4m3fn
    shape: str  # the shape expression of torch.empty(...), evaluated by `rows`/`count`


def _tree(path: Path = LOADER) -> ast.Module:
    return ast.parse(path.read_text())


def _method(tree: ast.Module, cls: str, name: str) -> ast.FunctionDef:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return item
    raise AssertionError(f"{cls}.{name} not found in {LOADER}: the reference loader changed")


def flavor_rule() -> tuple[str, str]:
    """(config key, value) that make vllm-gaudi skip the Gaudi2 scale adjustment, and where it is read.

    Read from `_update_scale_adjustment_if_needed(config)`: `config.get(KEY)` compared with a constant.
    """
    fn = _method(_tree(), "HPUCompressedTensorsConfig", "_update_scale_adjustment_if_needed")
    keys = [
        call.args[0].value
        for call in ast.walk(fn)
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "get"
        and isinstance(call.func.value, ast.Name)
        and call.func.value.id == fn.args.args[1].arg  # the `config` argument (after cls)
        and isinstance(call.args[0], ast.Constant)
    ]
    values = [
        node.value.value
        for node in ast.walk(fn)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    ]
    assert len(keys) == 1 and len(values) == 1, (keys, values)
    return keys[0], values[0]


def from_config_reads_flavor() -> bool:
    """`from_config(config)` (the dict under config.json's quantization_config) runs the flavor rule."""
    fn = _method(_tree(), "HPUCompressedTensorsConfig", "from_config")
    return "_update_scale_adjustment_if_needed(config)" in ast.unparse(fn)


def linear_params(strategy: str) -> dict[str, Param]:
    """Parameters `HPUCompressedTensorsW8A8Fp8.create_weights` registers for a weight strategy (TENSOR/CHANNEL),
    static input scales included: {name: Param}."""
    fn = _method(_tree(), "HPUCompressedTensorsW8A8Fp8", "create_weights")
    params: dict[str, Param] = {}

    def record(name: str, value: ast.expr) -> None:
        for call in ast.walk(value):
            if isinstance(call, ast.Call) and ast.unparse(call.func) == "torch.empty":
                dtype = next(k.value for k in call.keywords if k.arg == "dtype")
                dims = [ast.unparse(arg) for arg in call.args]
                expr = dims[0] if len(dims) == 1 else f"({', '.join(dims)})"
                params[name] = Param(name, ast.unparse(dtype).removeprefix("torch."), expr)
                return

    def visit(body: list[ast.stmt], active: bool) -> None:
        for stmt in body:
            if isinstance(stmt, ast.If):
                test = ast.unparse(stmt.test)
                branch = f"QuantizationStrategy.{strategy}" in test
                other = "QuantizationStrategy." in test and not branch
                visit(stmt.body, active and (branch or not other))
                visit(stmt.orelse, active and not branch)
            elif active and isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
                record(stmt.targets[0].id, stmt.value)

    visit(fn.body, True)
    registered = {
        call.args[0].value: call.args[1].id
        for call in ast.walk(fn)
        if isinstance(call, ast.Call)
        and ast.unparse(call.func) == "layer.register_parameter"
        and isinstance(call.args[0], ast.Constant)
    }
    return {name: params[var] for name, var in registered.items() if var in params}


def shape(param: Param, rows: int, cols: int) -> tuple[int, ...]:
    """The loader's shape for one checkpoint weight of [rows, cols] (one output partition, no TP split)."""
    names = {"output_partition_sizes": [rows], "output_size_per_partition": rows, "input_size_per_partition": cols}
    value = eval(param.shape, {"sum": sum, "len": len}, names)  # noqa: S307
    return value if isinstance(value, tuple) else (value,)


def reduced_to_max(cls: str) -> set[str]:
    """Scales `cls.process_weights_after_loading` collapses with `.max()` (the loader keeps only their max)."""
    fn = _method(_tree(), cls, "process_weights_after_loading")
    return {
        ast.unparse(node.func.value).removeprefix("layer.")
        for node in ast.walk(fn)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "max"
        and not node.args
    }


def hw_aligns_input_scale() -> bool:
    fn = _method(_tree(), "HPUCompressedTensorsW8A8Fp8", "process_weights_after_loading")
    return "ConvertScaleToHwAligned().calc(input_scale)" in ast.unparse(fn)


def kv_full_scales() -> tuple[float, float]:
    """(with scale adjustment, without): the FP8 maximum vllm-gaudi reads checkpoint k/v scales against."""
    fn = _method(_tree(), "HPUCompressedTensorsKVCacheMethod", "process_weights_after_loading")
    for node in ast.walk(fn):
        if (
            isinstance(node, ast.Assign)
            and ast.unparse(node.targets[0]) == "fp8_max_original"
            and isinstance(node.value, ast.IfExp)
        ):
            assert "scale_adjustment" in ast.unparse(node.value.test)
            return float(node.value.body.value), float(node.value.orelse.value)  # type: ignore[attr-defined]
    raise AssertionError("fp8_max_original not found: the reference loader changed")


def mla_kv_takes_max() -> bool:
    fn = _method(_tree(), "HPUCompressedTensorsKVCacheMethodForMLA", "process_weights_after_loading")
    return "max(layer._k_scale, layer._v_scale)" in ast.unparse(fn)


def remap_kv_scale_name():
    """vllm-gaudi's `oot_maybe_remap_kv_scale_name`, compiled from the reference source on its own."""
    tree = _tree()
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "oot_maybe_remap_kv_scale_name")
    module = ast.Module(body=[fn], type_ignores=[])
    log = logging.getLogger("vllm_gaudi_reference")
    for level in ("warning", "debug"):
        setattr(log, f"{level}_once", getattr(log, level))
    namespace: dict = {"logger": log}
    exec(compile(module, str(LOADER), "exec"), namespace)  # noqa: S102  (imports `regex`, a vLLM dependency)
    return namespace["oot_maybe_remap_kv_scale_name"]
