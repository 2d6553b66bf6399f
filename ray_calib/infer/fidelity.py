"""Does the FP8 model still say what the BF16 one says? Same texts through both, compared per position.

Each model scores the texts once (prefill only, `prompt_logprobs=K`) in its own process, so two
engines never share memory. Per next-token position we compare the argmax (top-1 agreement), the
KL divergence of the candidate from the baseline over the baseline's top-K tokens (a token missing
from the candidate's top-K gets the candidate's K-th logprob, an upper bound, so the figure is a
slight underestimate), and the perplexity of each model on the actual next tokens.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ray_calib import atomic
from ray_calib.errors import EngineError

TOP_K = 20  # vLLM's default max_logprobs


@dataclass
class Variant:
    name: str  # "baseline", "candidate", "candidate_fp8_kv"
    model: Path
    fp8_kv: bool = False


@dataclass
class FidelityReport:
    baseline: str
    candidate: str
    num_texts: int
    num_positions: int
    top_k: int = TOP_K
    perplexity: dict[str, float] = field(default_factory=dict)
    top1_agreement: dict[str, float] = field(default_factory=dict)
    mean_kl: dict[str, float] = field(default_factory=dict)

    def worst_agreement(self) -> float:
        return min(self.top1_agreement.values())


def evaluate(baseline: Path, candidate: Path, texts: list[str], *, tp_size: int, device: str,
             with_fp8_kv: bool = True, engine_options: dict | None = None) -> FidelityReport:
    """`engine_options`: further `InferConfig` fields for every engine (e.g. max_model_len, kv_cache_gib)."""
    variants = [Variant("baseline", baseline), Variant("candidate", candidate)]
    if with_fp8_kv:
        variants.append(Variant("candidate_fp8_kv", candidate, fp8_kv=True))
    scores = {v.name: _score_in_subprocess(v, texts, tp_size, device, engine_options or {}) for v in variants}
    reference = scores["baseline"]
    report = FidelityReport(baseline=str(baseline), candidate=str(candidate), num_texts=len(texts),
                            num_positions=sum(len(positions) for positions in reference))
    for name, positions in scores.items():
        report.perplexity[name] = _perplexity(positions)
        if name != "baseline":
            report.top1_agreement[name], report.mean_kl[name] = _compare(reference, positions)
    return report


def write_report(report: FidelityReport, path: Path) -> Path:
    return atomic.write_json(path, asdict(report))


def _compare(reference: list[list[dict]], other: list[list[dict]]) -> tuple[float, float]:
    agree = total = 0
    kl_sum = 0.0
    for ref_text, other_text in zip(reference, other):
        for ref, oth in zip(ref_text, other_text):
            total += 1
            agree += ref["argmax"] == oth["argmax"]
            floor = min(oth["top"].values())
            kl_sum += sum(math.exp(lp) * (lp - oth["top"].get(token, floor)) for token, lp in ref["top"].items())
    return agree / max(total, 1), kl_sum / max(total, 1)


def _perplexity(positions: list[list[dict]]) -> float:
    logprobs = [p["actual"] for text in positions for p in text]
    return math.exp(-sum(logprobs) / max(len(logprobs), 1))


def _score_in_subprocess(variant: Variant, texts: list[str], tp_size: int, device: str,
                         engine_options: dict) -> list[list[dict]]:
    """Score in a fresh process (spawned, not a daemon: vLLM starts its own workers)."""
    with tempfile.TemporaryDirectory(prefix="ray-calib-eval-") as tmp:
        out = Path(tmp) / "scores.json"
        context = multiprocessing.get_context("spawn")
        process = context.Process(target=_score, args=(str(variant.model), variant.fp8_kv, texts, tp_size, device,
                                                       str(out), engine_options), daemon=False)
        process.start()
        process.join()
        if process.exitcode != 0 or not out.exists():
            raise EngineError(f"scoring {variant.name} ({variant.model}) failed with exit code {process.exitcode}",
                              fix="run `ray-calib infer --model` on it to see vLLM's error.")
        return json.loads(out.read_text())


def _score(model: str, fp8_kv: bool, texts: list[str], tp_size: int, device: str, out: str,
           engine_options: dict) -> None:
    if tp_size == 1:  # one rank: run the engine in this process (DESIGN §9: ~3 s start, no nested workers)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import SamplingParams

    from ray_calib.engine.launch import build_llm
    from ray_calib.infer.runner import InferConfig, engine_config

    llm = build_llm(engine_config(InferConfig(model=Path(model), tp_size=tp_size, device=device, fp8_kv=fp8_kv,
                                              **engine_options)))
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=TOP_K)
    scored = []
    for output in llm.generate(texts, params, use_tqdm=False):
        positions = []
        for index, logprobs in enumerate(output.prompt_logprobs or []):
            if not logprobs:  # the first token has no prediction
                continue
            actual = output.prompt_token_ids[index]
            top = {str(t): lp.logprob for t, lp in logprobs.items() if lp.rank is not None and lp.rank <= TOP_K}
            argmax = next(str(t) for t, lp in logprobs.items() if lp.rank == 1)
            positions.append({"actual": logprobs[actual].logprob, "argmax": argmax, "top": top})
        scored.append(positions)
    Path(out).write_text(json.dumps(scored))
