"""`python inc_generate.py MODEL QUANT_CONFIG`: vLLM (CPU, TP 1) with INC's QUANTIZE applied at load.

Prints one JSON line: the greedy completions and how many modules INC replaced with its patched ones.
Used by test_inc_cpu.py (a separate process: the INC plugin patches vLLM's CPU model runner).
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from ray_calib.engine.launch import EngineConfig, build_llm

    model, quant_config = sys.argv[1], sys.argv[2]
    engine = EngineConfig(
        model=model,
        tp_size=1,
        max_model_len=256,
        max_num_seqs=4,
        worker_extension_cls="tests.measure.inc_generate.Probe",
        extra_env={"QUANT_CONFIG": quant_config, "RAY_CALIB_INC_ON_CPU": "1", "INC_TARGET_DEVICE": "cpu"},
    )
    llm = build_llm(engine)
    from vllm import SamplingParams

    outputs = llm.generate(
        ["The capital of France is", "def fibonacci(n):"], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False
    )
    patched = llm.collective_rpc("probe_patched")[0]
    print(json.dumps({"completions": [o.outputs[0].token_ids for o in outputs], "patched": patched}))


class Probe:
    def probe_patched(self) -> int:
        return sum(1 for m in self.model_runner.model.modules() if type(m).__name__.startswith("Patched"))


if __name__ == "__main__":
    main()
