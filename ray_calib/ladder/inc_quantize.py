"""Rung e: rung b's files unified to one rank and loaded by INC QUANTIZE, with one short generation.

The real job's shape in miniature: measured at one TP (here rung b's 2; the real job 16 over two nodes),
unified to the TP of one node (here 1; the real job 8) by `ray-calib unify`, then handed to INC's QUANTIZE
through the one-node QUANT_CONFIG `ray-calib quantize --device gaudiN` writes for it. An INC that cannot
read the unified files (names, world size, a node missing) fails here in minutes. On Gaudi `ray-calib infer`
loads it (vllm-gaudi + INC, as it will serve); on CPU INC runs in vLLM's CPU workers in quantize-dequantize
mode with power-of-two scales (INC has no Gaudi HW scales there), through `ladder.inc_generate`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ray_calib import atomic
from ray_calib.ladder.compressed import PROMPT, gaudi_type
from ray_calib.ladder.inc_generate import read_result
from ray_calib.ladder.inc_tp2 import STEP_TIMEOUT_S, WORLD, run_step, rung_b_output, rung_env
from ray_calib.ladder.run import LadderContext, RungFailed

UNIFIED_TP = WORLD // 2


def run_inc_quantize(context: LadderContext) -> str:
    host, kind, measure, model = rung_b_output(context, "be")
    work = context.run_dir / "ladder" / "e-inc-quantize"
    unified, configs = work / f"unified-tp{UNIFIED_TP}", work / "configs"
    env = rung_env(kind)
    unify = ["--in", measure, "--out", unified, "--to-tp", UNIFIED_TP, "--model", model, "--force"]
    run_step(host, work, "unify", unify, env)
    gaudi = gaudi_type(measure) if kind == "hpu" else "gaudi2"
    quantize = ["--model", model, "--measurements", unified, "--device", gaudi, "--format", "inc"]
    run_step(host, work, "quantize", [*quantize, "--out", configs, "--run-dir", work, "--force"], env)
    quant_config = _one_node_config(configs, host)
    if kind == "hpu":
        tokens = _infer_on_gaudi(host, work, model, quant_config, env)
        return f"TP {WORLD} files unified to TP {UNIFIED_TP}, loaded by INC QUANTIZE in vllm-gaudi: {tokens} tokens"
    patched, tokens = _generate_on_cpu(host, work, model, quant_config, env)
    return (
        f"TP {WORLD} files unified to TP {UNIFIED_TP}, loaded by INC QUANTIZE in vLLM's CPU workers "
        f"({patched} modules patched, quantize-dequantize): {tokens} tokens"
    )


def _one_node_config(configs: Path, host: str) -> Path:
    found = sorted(configs.glob("*one_node*.json"))
    if not found:
        raise RungFailed(host, f"`quantize` wrote no one-node QUANT_CONFIG in {configs}", fix="see quantize.log.")
    return found[0]


def _infer_on_gaudi(host: str, work: Path, model: Path, quant_config: Path, env: dict[str, str]) -> int:
    atomic.write_text(work / "prompts.txt", PROMPT + "\n")
    infer = ["--model", model, "--quant-config", quant_config, "--prompts", work / "prompts.txt"]
    infer += ["--max-new-tokens", "4", "--tp", UNIFIED_TP, "--device", "auto", "--run-dir", work]
    run_step(host, work, "infer", infer, env)
    completions = json.loads((work / "infer" / "completions.json").read_text())
    return completions[0].get("num_tokens", 0) if completions else 0


def _generate_on_cpu(host: str, work: Path, model: Path, quant_config: Path, env: dict[str, str]) -> tuple[int, int]:
    """INC on CPU: the same config with the scale method INC has there, quantize-dequantize."""
    config = json.loads(quant_config.read_text())
    cpu_config = atomic.write_json(
        work / "quant_config_cpu.json", {**config, "scale_method": "maxabs_pow2", "use_qdq": True}
    )
    log = work / "inc_generate.log"
    with open(log, "wb") as handle:
        proc = subprocess.run(
            [sys.executable, "-m", "ray_calib.ladder.inc_generate", str(model), str(cpu_config)],
            stdout=subprocess.PIPE,
            stderr=handle,
            env=env,
            timeout=STEP_TIMEOUT_S,
        )
    result = read_result(proc.stdout.decode(errors="replace"))
    if proc.returncode != 0 or result is None:
        raise RungFailed(
            host, f"INC QUANTIZE of the unified files failed in vLLM (exit {proc.returncode})", fix=f"see {log}."
        )
    tokens = len(result["completions"][0]) if result["completions"] else 0
    if not result["patched"] or not tokens:
        raise RungFailed(
            host,
            f"INC patched {result['patched']} modules and vLLM generated {tokens} tokens from the unified files",
            fix=f"see {log}: INC did not apply QUANT_CONFIG {cpu_config}.",
        )
    return result["patched"], tokens
