"""Scale audit: every scale the FP8 checkpoint carries is in use in the engine that loaded it.

vLLM drops a checkpoint scale it cannot place with a log line only: k/v scales of an attention layer whose
quantization method has no KV-cache scheme stay at 1.0, and the engine serves a silently wrong model. So
after `infer`, `eval` and `infer --serve` load an FP8 checkpoint, the engine itself is read back
(`ScaleAuditExtension`, driven over `collective_rpc` like measure's observers; a server over vLLM's dev
endpoint /collective_rpc, on a loopback host only):

    weight / input   every quantized linear module of the checkpoint (in the module vLLM fuses it into,
                     `model.names`) holds a weight_scale (and input_scale when the checkpoint has one)
    experts          every MoE layer with per-expert scales holds expert weight scales
    expert_input     per-expert static input scales (gate/up and down): the engine keeps one per layer and
                     projection (their max), so differing ones are collapsed; `quantize` writes that max
    k/v              every attention layer with k/v scales runs with exactly those values (not 1.0)
                     when the KV cache is FP8; a BF16 cache uses none, by the user's choice

`audit` compares (pure); `check` fails naming the first dropped scale and the vLLM backend, unless the user
passed --allow-scale-loss.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_calib.errors import EngineError
from ray_calib.model.config import model_config
from ray_calib.model.names import vllm_modules
from ray_calib.model.safetensors_io import ShardReader

AUDIT_EXTENSION = "ray_calib.infer.audit.ScaleAuditExtension"
_EXPERT_RE = re.compile(r"^(.*\.experts)\.(\d+)\.[^.]+$")
_KINDS = ("weight", "input", "experts", "expert_input", "kv")


@dataclass
class CarriedScales:
    """The scales of a checkpoint, keyed by the module vLLM holds them in."""

    linear: dict[str, set[str]] = field(default_factory=dict)  # checkpoint module -> {"weight", "input"}
    experts: dict[str, set[int]] = field(default_factory=dict)  # MoE module (…mlp.experts) -> experts with scales
    # MoE module -> {"w13" (gate/up) | "w2" (down): {expert: input scale}}
    expert_inputs: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    # attention prefix (…self_attn; compressed-tensors names them …self_attn.k_proj.k_scale) -> {"k": .., "v": ..}
    kv: dict[str, dict[str, float]] = field(default_factory=dict)


def carried_scales(checkpoint: Path) -> CarriedScales:
    """Read the scale tensors' names from the shards' headers (and the k/v values, which are scalars)."""
    carried = CarriedScales()
    for shard in sorted(Path(checkpoint).glob("*.safetensors")):
        with ShardReader(shard) as reader:
            for name in reader.tensors:
                module, _, leaf = name.rpartition(".")
                if leaf in ("k_scale", "v_scale", "kv_scale"):  # kv_scale: the older format, one for both
                    value = float(reader.read(name).float().reshape(-1)[0])
                    attention = module.rpartition(".")[0] if module.endswith("_proj") else module
                    scales = carried.kv.setdefault(attention, {})
                    scales["k" if leaf != "v_scale" else "v"] = value
                    if leaf == "kv_scale":
                        scales.setdefault("v", value)
                elif leaf in ("weight_scale", "input_scale"):
                    if (expert := _EXPERT_RE.match(module)) is not None:
                        carried.experts.setdefault(expert[1], set()).add(int(expert[2]))
                        if leaf == "input_scale":
                            kind = "w2" if module.endswith("down_proj") else "w13"
                            values = carried.expert_inputs.setdefault(expert[1], {}).setdefault(kind, {})
                            values[int(expert[2])] = float(reader.read(name).float().max())
                    else:
                        carried.linear.setdefault(module, set()).add(leaf.split("_")[0])
    return carried


class ScaleAuditExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`): what each module holds after loading."""

    model_runner: Any  # set by the vLLM worker this class is mixed into

    def ray_calib_scales(self) -> dict[str, Any]:
        modules = {}
        for name, module in self.model_runner.model.named_modules():
            entry = _module_scales(module)
            if entry:
                modules[name] = entry
        from vllm.distributed import get_tensor_model_parallel_rank

        return {"rank": get_tensor_model_parallel_rank(), "modules": modules}


def _module_scales(module) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
    for kind in ("weight", "input"):
        if any(kind + "_scale" in key and value is not None for key, value in own.items()):
            entry[kind] = True
        elif getattr(module, kind + "_scale", None) is not None:
            entry[kind] = True
    expert_scales = own.get("w13_weight_scale")
    if expert_scales is not None:  # fused MoE: one weight scale (or row of them) per local expert
        entry["expert_scales"] = int(expert_scales.shape[0]) if expert_scales.dim() else 1
        inputs = {kind: own.get(f"{kind}_input_scale") for kind in ("w13", "w2")}
        entry["expert_input_scales"] = {kind: int(t.numel()) for kind, t in inputs.items() if t is not None}
    if hasattr(module, "_k_scale_float"):
        impl = getattr(module, "impl", None)
        entry["kv"] = {"k": float(module._k_scale_float), "v": float(module._v_scale_float)}
        entry["kv_cache_dtype"] = str(getattr(module, "kv_cache_dtype", ""))
        entry["backend"] = type(impl).__name__ if impl is not None else type(module).__name__
    return entry


@dataclass
class ScaleAudit:
    counts: dict[str, dict[str, int]]  # kind -> {"carried": n, "in_use": m}
    dropped: list[str]  # one line per scale the engine does not use
    backends: list[str]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"counts": self.counts, "dropped": self.dropped, "backends": self.backends, "notes": self.notes}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScaleAudit:
        return cls(data["counts"], list(data["dropped"]), list(data["backends"]), list(data.get("notes", [])))

    def summary(self) -> str:
        parts = [f"{c['in_use']}/{c['carried']} {kind}" for kind, c in self.counts.items() if c["carried"]]
        return f"scale audit: {', '.join(parts) or 'no scales'} in use ({', '.join(self.backends) or 'no attention'})"


def audit(carried: CarriedScales, ranks: list[dict[str, Any]]) -> ScaleAudit:
    """Checkpoint scales against what every rank's engine holds (pure: no vLLM here)."""
    backends = sorted({m["backend"] for r in ranks for m in r["modules"].values() if "backend" in m})
    counts = {kind: {"carried": 0, "in_use": 0} for kind in _KINDS}
    dropped: list[str] = []
    notes: list[str] = []
    where = f"vLLM backend {'/'.join(backends) or '?'}"
    for module, kinds in sorted(carried.linear.items()):
        for kind in sorted(kinds):
            counts[kind]["carried"] += 1
            held = [_find(r["modules"], module) for r in ranks]
            if all(h is not None and h.get(kind) for h in held):
                counts[kind]["in_use"] += 1
            else:
                dropped.append(f"{module}: its {kind} scale is not held by the engine ({where})")
    for module, experts in sorted(carried.experts.items()):
        counts["experts"]["carried"] += 1
        per_rank = [_expert_scales(r["modules"], module) for r in ranks]
        if max(per_rank) == len(experts) or sum(per_rank) == len(experts):  # every rank all experts (TP), or EP
            counts["experts"]["in_use"] += 1
        else:
            dropped.append(
                f"{module}: {len(experts)} experts carry weight scales, the engine holds {max(per_rank)} per rank "
                f"({'ignored' if not max(per_rank) else 'collapsed'}; {where})"
            )
    for moe, projections in sorted(carried.expert_inputs.items()):
        for kind, per_expert in sorted(projections.items()):
            counts["expert_input"]["carried"] += 1
            kept = [_expert_inputs(r["modules"], moe, kind) for r in ranks]
            problem = _expert_input_problem(kind, per_expert, kept)
            if problem:
                dropped.append(f"{moe}: {problem} ({where})")
            else:
                counts["expert_input"]["in_use"] += 1
    for prefix, values in sorted(carried.kv.items()):
        counts["kv"]["carried"] += 1
        layers = [_attention(r["modules"], prefix) for r in ranks]
        if any(layer is None for layer in layers):
            dropped.append(f"{prefix}: k/v scales carried, but the engine has no attention layer there ({where})")
            continue
        if not all(str(layer["kv_cache_dtype"]).startswith("fp8") for layer in layers if layer):
            notes.append("BF16 KV cache: the checkpoint's k/v scales are unused by choice (--no-fp8-kv)")
            continue
        bad = next((_kv_problem(values, layer) for layer in layers if layer and _kv_problem(values, layer)), None)
        if bad:
            dropped.append(f"{prefix}: {bad} (vLLM backend {layers[0]['backend'] if layers[0] else '?'})")
        else:
            counts["kv"]["in_use"] += 1
    return ScaleAudit(counts=counts, dropped=dropped, backends=backends, notes=sorted(set(notes)))


def _find(modules: dict[str, Any], checkpoint_module: str) -> dict[str, Any] | None:
    """The engine module holding `checkpoint_module`'s scales: its fused group (q/k/v -> qkv_proj, ...) or
    itself, by exact name, else under a prefix (models may nest the HF names)."""
    for name in vllm_modules(checkpoint_module):
        if name in modules:
            return modules[name]
        found = next((entry for key, entry in modules.items() if key.endswith("." + name)), None)
        if found is not None:
            return found
    return None


def _expert_scales(modules: dict[str, Any], name: str) -> int:
    """Per-expert weight scales under the engine's MoE module `name` (vLLM keeps them in a child)."""
    return max(
        (
            entry.get("expert_scales", 0)
            for key, entry in modules.items()
            if key == name or key.startswith(name + ".") or key.endswith("." + name) or f".{name}." in key
        ),
        default=0,
    )


def _expert_inputs(modules: dict[str, Any], name: str, kind: str) -> int:
    """How many static input scales of projection `kind` the engine's MoE module `name` keeps (0: none)."""
    return max(
        (
            entry.get("expert_input_scales", {}).get(kind, 0)
            for key, entry in modules.items()
            if key == name or key.startswith(name + ".") or key.endswith("." + name) or f".{name}." in key
        ),
        default=0,
    )


def _expert_input_problem(kind: str, values: dict[int, float], held: list[int]) -> str | None:
    """Per-expert input scales the engine ignores, or keeps fewer of than differ (collapsed to their max)."""
    what = f"{len(values)} experts carry {_PROJECTIONS[kind]} input scales"
    low, high = min(values.values()), max(values.values())
    if not all(held):
        return f"{what}, the engine keeps none (ignored)"
    if min(held) < len(values) and not math.isclose(low, high, rel_tol=1e-6):
        return f"{what} from {low:.6g} to {high:.6g}, the engine keeps {min(held)} per rank (collapsed to their max)"
    return None


_PROJECTIONS = {"w13": "gate/up", "w2": "down"}


def _attention(modules: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    return next(
        (entry for key, entry in modules.items() if "kv" in entry and (key.startswith(prefix + ".") or key == prefix)),
        None,
    ) or next((entry for key, entry in modules.items() if "kv" in entry and ("." + prefix + ".") in key), None)


def _kv_problem(carried: dict[str, float], layer: dict[str, Any]) -> str | None:
    for which in ("k", "v"):
        want, held = carried.get(which), layer["kv"][which]
        if want is not None and not math.isclose(want, held, rel_tol=1e-5):
            replaced = " (replaced by 1.0)" if held == 1.0 else ""
            return f"{which} scale {want:.6g} in the checkpoint, {held:.6g} in the engine{replaced}"
    return None


def check(result: ScaleAudit, *, allow_scale_loss: bool) -> None:
    """Fail on the first dropped scale unless the user accepts the loss."""
    if result.dropped and not allow_scale_loss:
        raise EngineError(
            f"{len(result.dropped)} calibrated scale(s) not in use, e.g. {result.dropped[0]}",
            fix="serve with a vLLM backend that loads them (or re-quantize), or pass --allow-scale-loss to accept it.",
        )


def is_quantized(checkpoint: Path) -> bool:
    """Whether the checkpoint carries a quantization config (only those have scales to audit)."""
    try:
        return "quantization_config" in model_config(checkpoint)
    except Exception:  # noqa: BLE001 - an unreadable config was reported where the model was loaded
        return False


def audit_engine(llm, checkpoint: Path) -> ScaleAudit | None:
    """Read the scales back from a running engine; None when the model carries no quantization config."""
    if not is_quantized(checkpoint):
        return None
    return audit(carried_scales(checkpoint), llm.collective_rpc("ray_calib_scales"))
