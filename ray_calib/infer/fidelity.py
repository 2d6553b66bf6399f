"""Does the FP8 model still say what the BF16 one says? Same tokens through both, compared per position.

The texts are tokenized once, with the baseline's tokenizer, and every model scores exactly those
token ids (prefill only, `prompt_logprobs=K`), each in its own process so two engines never share
memory. A text longer than the context is scored in consecutive windows (one line says so). Per
next-token position:
    top-1 agreement  the candidate's argmax equals the baseline's
    KL               KL(baseline || candidate) over the baseline's top-K tokens plus one bucket for the
                     rest of the vocabulary: the KL of the two coarse distributions, never negative and
                     never above the full KL (log-sum inequality); a token missing from the candidate's
                     top-K gets the candidate's K-th logprob (an upper bound of its true logprob)
    perplexity       exp of the mean negative logprob of the actual next tokens
The KV cache dtype is always passed to vLLM explicitly ("bfloat16" or "fp8"): with "auto" vLLM 0.32 runs
whatever KV scheme the checkpoint carries, so a no-FP8-KV variant of a checkpoint with k/v scales would
silently run an FP8 cache. Each variant records the dtype its engine really used. The FP8-KV candidate is
scored with its calibrated k/v scales and, beside it, with vLLM's scale 1.0 (`unit_kv`): calibrating is
worth it only where it beats 1.0.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ray_calib import atomic, ui
from ray_calib.engine.launch import build_llm
from ray_calib.infer.audit import audit_engine, carried_scales
from ray_calib.infer.isolated import run_isolated
from ray_calib.infer.runner import InferConfig, engine_config
from ray_calib.infer.unit_kv import without_kv_scales

TOP_K = 20  # vLLM's default max_logprobs
UNIT_KV = "candidate_fp8_kv_1"  # the candidate on an FP8 cache with k/v scale 1.0 (its k/v scales removed)
Position = dict  # {"actual": logprob of the real next token, "argmax": token id, "top": {token id: logprob}}


@dataclass
class Variant:
    name: str  # "baseline", "candidate", "candidate_fp8_kv", UNIT_KV
    model: Path
    fp8_kv: bool = False
    options: dict = field(default_factory=dict)  # InferConfig fields of this variant's engine alone


@dataclass
class FidelityReport:
    baseline: str
    candidate: str
    num_texts: int
    num_positions: int
    top_k: int = TOP_K
    num_windows: int = 0
    perplexity: dict[str, float] = field(default_factory=dict)
    top1_agreement: dict[str, float] = field(default_factory=dict)
    mean_kl: dict[str, float] = field(default_factory=dict)
    kv_cache_dtype: dict[str, str] = field(default_factory=dict)  # what each variant's engine ran
    notes: list[str] = field(default_factory=list)
    scale_audit: dict[str, dict] = field(default_factory=dict)  # variant -> `infer.audit` of its FP8 engine

    def worst_agreement(self) -> float:
        return min(self.top1_agreement.values())


# ---- the metrics (pure functions over scored positions) -------------------------------------------------


def top1_agreement(reference: list[list[Position]], other: list[list[Position]]) -> float:
    pairs = list(_pairs(reference, other))
    return sum(ref["argmax"] == oth["argmax"] for ref, oth in pairs) / max(len(pairs), 1)


def mean_kl(reference: list[list[Position]], other: list[list[Position]]) -> float:
    pairs = list(_pairs(reference, other))
    return sum(position_kl(ref["top"], oth["top"]) for ref, oth in pairs) / max(len(pairs), 1)


def position_kl(reference_top: dict[str, float], other_top: dict[str, float]) -> float:
    """KL(p || q) over p's top tokens plus a rest bucket (see the module docstring)."""
    floor = min(other_top.values())
    p = [math.exp(lp) for lp in reference_top.values()]
    q = [math.exp(other_top.get(token, floor)) for token in reference_top]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)
    p_rest, q_rest = 1.0 - sum(p), 1.0 - sum(q)
    if p_rest > 1e-12:
        kl += p_rest * math.log(p_rest / max(q_rest, 1e-12))
    return max(kl, 0.0)


def perplexity(positions: list[list[Position]]) -> float:
    logprobs = [p["actual"] for text in positions for p in text]
    return math.exp(-sum(logprobs) / max(len(logprobs), 1))


def _pairs(reference: list[list[Position]], other: list[list[Position]]):
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} scored texts against {len(other)}")
    for ref_text, other_text in zip(reference, other):
        if len(ref_text) != len(other_text):
            raise ValueError(f"a text scored at {len(ref_text)} positions against {len(other_text)}")
        yield from zip(ref_text, other_text)


# ---- texts -> token windows --------------------------------------------------------------------------


def token_windows(token_ids: list[list[int]], max_model_len: int) -> tuple[list[list[int]], str | None]:
    """Each text's ids cut into consecutive windows the engine takes (prompt + 1 new token <= context).

    Returns the windows and, when any text was cut, the one-line notice that says so.
    """
    size = max_model_len - 1
    windows = [ids[start : start + size] for ids in token_ids for start in range(0, len(ids), size)]
    windows = [w for w in windows if len(w) >= 2]  # one token predicts nothing
    long = [len(ids) for ids in token_ids if len(ids) > size]
    if not long:
        return windows, None
    return windows, (
        f"{len(long)} of {len(token_ids)} texts are longer than the {max_model_len}-token context "
        f"(longest {max(long)} tokens): scored in consecutive windows of up to {size} tokens, "
        f"{len(windows)} windows in all"
    )


def tokenize(model: Path, texts: list[str]) -> list[list[int]]:
    """Token ids as vLLM would make them (the tokenizer's special tokens included)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    return [tokenizer(text)["input_ids"] for text in texts]


# ---- running the variants --------------------------------------------------------------------------------


def evaluate(
    baseline: Path,
    candidate: Path,
    texts: list[str],
    *,
    tp_size: int,
    device: str,
    with_fp8_kv: bool = True,
    max_model_len: int = 1024,
    engine_options: dict | None = None,
    baseline_options: dict | None = None,
    candidate_options: dict | None = None,
    candidate_fp8_kv: bool = False,
) -> FidelityReport:
    """Score baseline and candidate (both on a BF16 cache) on the same token windows; `with_fp8_kv`
    adds the candidate on an FP8 cache with its calibrated k/v scales and, when it has some, without them
    (`UNIT_KV`: vLLM's scale 1.0, `unit_kv`). `engine_options`: further `InferConfig` fields for every
    engine (e.g. kv_cache_gib, enforce_eager); `baseline_options` / `candidate_options` those of one engine
    (Gaudi: the baseline as it is, the candidate with INC's QUANT_CONFIG and the KV cache it decides)."""
    windows, notice = token_windows(tokenize(baseline, texts), max_model_len)
    notes = [notice] if notice else []
    variants = [
        Variant("baseline", baseline, options=baseline_options or {}),
        Variant("candidate", candidate, fp8_kv=candidate_fp8_kv, options=candidate_options or {}),
    ]
    options = {**(engine_options or {}), "max_model_len": max_model_len}
    with tempfile.TemporaryDirectory(prefix="ray-calib-kv-scale-1-") as scratch:
        if with_fp8_kv:
            variants.append(Variant("candidate_fp8_kv", candidate, fp8_kv=True))
            kv = [v for scales in carried_scales(candidate).kv.values() for v in scales.values()]
            unit = without_kv_scales(candidate, Path(scratch) / "model") if set(kv) != {1.0} else None
            if unit is not None:  # the same cache with vLLM's scale 1.0: do the calibrated scales beat it?
                variants.append(Variant(UNIT_KV, unit, fp8_kv=True))
            elif kv:
                notes.append("the candidate's k/v scales are 1.0 (quantize's choice): its FP8-KV row is scale 1.0")
            else:
                notes.append("the candidate carries no k/v scales: its FP8-KV row is vLLM's scale 1.0")
        tokens = sum(len(w) for w in windows)
        scores = {}
        for index, variant in enumerate(variants, 1):
            ui.stage(index, len(variants), f"score {variant.name}", f"{len(windows)} windows, {tokens} tokens")
            started = time.perf_counter()
            scores[variant.name] = score(variant, windows, tp_size=tp_size, device=device, engine_options=options)
            ui.note(f"{variant.name}: scored in {time.perf_counter() - started:.0f} s")
    reference = scores["baseline"]["positions"]
    report = FidelityReport(
        baseline=str(baseline),
        candidate=str(candidate),
        num_texts=len(texts),
        num_positions=sum(len(p) for p in reference),
        num_windows=len(windows),
        notes=notes,
    )
    for name, scored in scores.items():
        report.perplexity[name] = perplexity(scored["positions"])
        report.kv_cache_dtype[name] = scored["kv_cache_dtype"]
        if scored.get("audit"):
            report.scale_audit[name] = scored["audit"]
        if name != "baseline":
            report.top1_agreement[name] = top1_agreement(reference, scored["positions"])
            report.mean_kl[name] = mean_kl(reference, scored["positions"])
    return report


def score(variant: Variant, windows: list[list[int]], *, tp_size: int, device: str, engine_options: dict) -> dict:
    """{"positions": per-window scored positions, "kv_cache_dtype": what the engine ran}, in a fresh process."""
    return run_isolated(
        _score,
        str(variant.model),
        variant.fp8_kv,
        windows,
        tp_size,
        device,
        {**engine_options, **variant.options},
        what=f"scoring {variant.name} ({variant.model})",
        device=device,
    )


def write_report(report: FidelityReport, path: Path, verdict: dict | None = None) -> Path:
    """eval.json: the figures, and the verdict `push` checks (which checkpoint, threshold, passed)."""
    return atomic.write_json(path, {**asdict(report), **({"verdict": verdict} if verdict else {})})


def format_table(report: FidelityReport) -> str:
    """The quality table: one row per variant."""
    rows = [f"{'variant':<18} {'KV cache':<9} {'perplexity':>10} {'mean KL':>8} {'top-1':>6}"]
    for name, ppl in report.perplexity.items():
        kl = f"{report.mean_kl[name]:.4f}" if name in report.mean_kl else "-"
        top1 = f"{report.top1_agreement[name]:.3f}" if name in report.top1_agreement else "-"
        rows.append(f"{name:<18} {report.kv_cache_dtype.get(name, '?'):<9} {ppl:>10.3f} {kl:>8} {top1:>6}")
    return "\n".join(rows)


def _score(model: str, fp8_kv: bool, windows: list[list[int]], tp_size: int, device: str, engine_options: dict) -> dict:
    if tp_size == 1:  # one rank: run the engine in this process (~3 s start, no nested workers)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import SamplingParams

    config = engine_config(
        InferConfig(model=Path(model), tp_size=tp_size, device=device, fp8_kv=fp8_kv, **engine_options)
    )
    llm = build_llm(config)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=TOP_K)
    scored = []
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in windows], params, use_tqdm=False)
    for output in outputs:
        positions = []
        for index, logprobs in enumerate(output.prompt_logprobs or []):
            if not logprobs:  # the first token has no prediction
                continue
            actual = output.prompt_token_ids[index]
            top = {str(t): lp.logprob for t, lp in logprobs.items() if lp.rank is not None and lp.rank <= TOP_K}
            argmax = next(str(t) for t, lp in logprobs.items() if lp.rank == 1)
            positions.append({"actual": logprobs[actual].logprob, "argmax": argmax, "top": top})
        scored.append(positions)

    audit = audit_engine(llm, Path(model)) if device != "hpu" else None
    return {
        "positions": scored,
        "kv_cache_dtype": _engine_kv_dtype(llm, config.kv_cache_dtype),
        "audit": audit.to_json() if audit else None,
    }


def _engine_kv_dtype(llm, requested: str) -> str:
    """The cache dtype vLLM settled on (its resolved config), not just what was asked for."""
    try:
        return str(llm.llm_engine.vllm_config.cache_config.cache_dtype)
    except AttributeError:
        return requested


def load_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())
