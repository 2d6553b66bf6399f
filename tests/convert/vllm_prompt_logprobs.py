"""Run in a subprocess by test_vllm_load: load MODEL in vLLM on CPU, print the log-probability it gives each
token of a fixed prompt and its greedy continuation, as one JSON line."""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PROMPT = [0, 17, 230, 51, 9, 77, 140, 3, 201, 66, 12, 190, 45, 8, 99, 250]

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    llm = LLM(sys.argv[1], enforce_eager=True, max_model_len=128, max_num_seqs=4, skip_tokenizer_init=True)
    params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0)
    output = llm.generate([{"prompt_token_ids": PROMPT}], params)[0]
    logprobs = [entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], PROMPT[1:])]
    print("RESULT " + json.dumps({"logprobs": logprobs, "tokens": list(output.outputs[0].token_ids)}), flush=True)
