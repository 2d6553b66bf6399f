"""Rung f: the compressed-tensors route (`quantize --format compressed-tensors`) loads and generates.

From rung b's measurements and tiny model: the Gaudi checkpoint is written for this cluster's Gaudi type (on
CPU for Gaudi2, the stricter range) and loaded by `ray-calib infer` for one short generation: vllm-gaudi's
compressed-tensors loader on Gaudi (TP 2, as rung b measured), vLLM's on CPU (one rank: the same format and
fields, vllm-gaudi's flavor key ignored).
"""

from __future__ import annotations

import json

from ray_calib.inc import read_meta
from ray_calib.ladder.inc_tp2 import WORLD, run_step, rung_b_output, rung_env
from ray_calib.ladder.run import LadderContext, RungFailed

PROMPT = "The capital of France is"


def run_compressed(context: LadderContext) -> str:
    host, kind, measure, model = rung_b_output(context, "bf")
    work = context.run_dir / "ladder" / "f-compressed-tensors"
    gaudi = gaudi_type(measure) if kind == "hpu" else "gaudi2"
    checkpoint = work / f"fp8-{gaudi}"
    env = rung_env(kind)
    quantize = ["--model", model, "--measurements", measure, "--device", gaudi, "--format", "compressed-tensors"]
    run_step(host, work, "quantize", [*quantize, "--out", checkpoint, "--force"], env)
    work.mkdir(parents=True, exist_ok=True)
    (work / "prompts.txt").write_text(PROMPT + "\n")
    infer = ["--model", checkpoint, "--prompts", work / "prompts.txt", "--max-new-tokens", "4", "--run-dir", work]
    infer += ["--device", "auto", "--tp", str(WORLD)] if kind == "hpu" else ["--device", "cpu", "--tp", "1"]
    run_step(host, work, "infer", [*infer, "--enforce-eager"] if kind != "hpu" else infer, env)
    completions = json.loads((work / "infer" / "completions.json").read_text())
    if not completions or completions[0].get("num_tokens", 0) < 1:
        raise RungFailed(host, f"{checkpoint} loaded but generated nothing", fix=f"see {work / 'infer.log'}.")
    where = f"vllm-gaudi at TP {WORLD}" if kind == "hpu" else "vLLM on CPU"
    return f"{checkpoint.name} ({gaudi}) loaded by {where}, generated {completions[0]['num_tokens']} tokens"


def gaudi_type(measure) -> str:
    """The Gaudi generation rung b measured on (its meta), Gaudi2 when it does not say."""
    meta = read_meta(measure)
    return meta.device_type if meta and meta.device_type in ("gaudi2", "gaudi3") else "gaudi2"
