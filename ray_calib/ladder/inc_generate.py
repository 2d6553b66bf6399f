"""`python -m ray_calib.ladder.inc_generate MODEL QUANT_CONFIG`: vLLM on CPU at TP 1 with INC's QUANTIZE
applied at load (`measure.inc_cpu` does in vLLM's CPU workers what vllm-gaudi's model runner does).

Prints one line, `RESULT` and JSON: the greedy completions (token ids) and how many modules INC replaced with
its patched ones. Rung e runs it where there is no Gaudi; a separate process, because the INC plugin patches vLLM's CPU
model runner for the whole process.
"""

from __future__ import annotations

import json
import sys

from ray_calib.engine.launch import EngineConfig, build_llm
from ray_calib.measure.inc_cpu import INC_ON_CPU_ENV

PROMPTS = ("The capital of France is", "def fibonacci(n):")
RESULT = "RESULT "  # the line to read back: vLLM prints to stdout too


def read_result(stdout: str) -> dict | None:
    """The JSON `main` printed, from the process's whole stdout (None: it printed none)."""
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT)]
    return json.loads(lines[-1].removeprefix(RESULT)) if lines else None


def main() -> None:
    model, quant_config = sys.argv[1], sys.argv[2]
    engine = EngineConfig(
        model=model,
        tp_size=1,
        max_model_len=256,
        max_num_seqs=4,
        worker_extension_cls="ray_calib.ladder.inc_generate.Probe",
        extra_env={"QUANT_CONFIG": quant_config, INC_ON_CPU_ENV: "1", "INC_TARGET_DEVICE": "cpu"},
    )
    llm = build_llm(engine)
    from vllm import SamplingParams

    outputs = llm.generate(list(PROMPTS), SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    patched = llm.collective_rpc("probe_patched")[0]
    print(RESULT + json.dumps({"completions": [o.outputs[0].token_ids for o in outputs], "patched": patched}))


class Probe:
    """Mixed into vLLM's worker: how many of the model's modules INC replaced."""

    model_runner: object  # set by the vLLM worker this class is mixed into

    def probe_patched(self) -> int:
        model = self.model_runner.model  # type: ignore[attr-defined]
        return sum(1 for m in model.modules() if type(m).__name__.startswith("Patched"))


if __name__ == "__main__":
    main()
