"""Checks that need the observers on a live vLLM model, run in a fresh process (one engine, TP=1, in-process).

    python tests/measure/engine_checks.py MODEL [ATTENTION_BACKEND]   -> one JSON line on stdout

1. Plain greedy generate, then the same prompts with the observers installed, then again after
   `ModelObserver.remove()`: the three token streams must be identical (observers only read), and
   after `remove()` every hook is gone and every replaced attribute is the original again.
2. MLA: the observers record kv_b_proj's input from MLAAttention.forward's latent argument. A plain
   forward pre-hook on kv_b_proj is the witness: in a prefill-only pass (one new token), where the
   CPU_MLA backend calls kv_b_proj on every token, both must see the same maximum.
"""

from __future__ import annotations

import json
import os
import sys

PROMPTS = [[5 + (7 * i + 3 * j) % 900 for j in range(20 + 3 * i)] for i in range(6)]


def state(model) -> dict[str, object]:
    """Everything the observers may touch, by identity: hooks, quant methods, patched attributes."""
    snapshot: dict[str, object] = {}
    for name, module in model.named_modules():
        snapshot[f"{name}:hooks"] = (len(module._forward_pre_hooks), len(module._forward_hooks))
        if "quant_method" in vars(module):
            method = vars(module)["quant_method"]
            snapshot[f"{name}:quant_method"] = (id(method), sorted(vars(method)) if hasattr(method, "__dict__") else [])
        for attribute in ("_apply_quant_method",):
            snapshot[f"{name}:{attribute}"] = attribute in vars(module)
        router = vars(module).get("router")
        if router is not None:
            snapshot[f"{name}:router"] = (id(router), "select_experts" in vars(router))
    return snapshot


def main(model_dir: str, attention_backend: str | None) -> dict:
    import torch
    from vllm import SamplingParams

    from ray_calib.engine.launch import EngineConfig, build_llm
    from ray_calib.measure.observers import Blocklist, ModelObserver
    from ray_calib.measure.preflight import blocklist

    llm = build_llm(
        EngineConfig(
            model=model_dir,
            max_model_len=256,
            max_num_seqs=8,
            observe_weights=True,
            attention_backend=attention_backend,
        )
    )
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    prompts = [{"prompt_token_ids": ids} for ids in PROMPTS]

    def generate(tokens: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=tokens, temperature=0.0)
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

    before_state, plain = state(model), generate(8)
    names, types = blocklist(None, fp8_kv=True, moe=True)
    observer = ModelObserver(model, fp8_kv=True, blocklist=Blocklist(tuple(names), tuple(types)))
    observed = generate(8)
    observer.reset()

    witness: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if name.endswith(".kv_b_proj"):

            def hook(mod, args, name=name):
                value = float(args[0].detach().abs().max())
                witness[name] = max(witness.get(name, 0.0), value)

            handles.append(module.register_forward_pre_hook(hook))
    generate(1)  # prefill only
    for handle in handles:
        handle.remove()
    nodes = observer.collect()["nodes"]
    recorded = {name: nodes[name]["inputs"][0][0][0] for name in nodes if name.endswith(".kv_b_proj")}
    backends = observer.backends()
    observer.remove()
    after_state, after = state(model), generate(8)
    del torch
    return {
        "backends": backends,
        "plain": plain,
        "observed": observed,
        "after_remove": after,
        "state_restored": before_state == after_state,
        "state_diff": sorted(k for k in before_state if before_state[k] != after_state.get(k))[:5],
        "kv_b_proj_observed": recorded,
        "kv_b_proj_forward_hook": witness,
    }


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    result = main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
    print(json.dumps(result))
