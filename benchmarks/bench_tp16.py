"""The headline shape end to end on this box: measure at TP=16 over two nodes (8 ranks each), serve at TP=8.

    python benchmarks/bench_tp16.py [--samples 32] [--kv-cache-gib 0.125] [--keep DIR]

Every stage is the real `ray-calib` command in its own process, timed:
    1 model      make-tiny-model --arch deepseek_r1 (MLA, 16 heads, 256 routed experts top-8 in 4 of 8
                 groups, a shared expert, first 2 of 5 layers dense) + make-calib-set
    2 up         two Ray nodes, 127.0.0.3 and 127.0.0.4, 8 devices each, over an sshd started here
    3 measure    measure -t 16 --fp8-kv across both nodes; every rank's ranges gathered to the head
    4 unify      unify --to-tp 8
    5 quantize   quantize --low-cpu-mem
    6 down       the Ray cluster is stopped (its memory is needed for serving)
    7 reference  infer on the BF16 model at TP=1: the greedy answer to check the served one against
    8 serve      infer --serve --detach at TP=8 on this node; one completion, compared with the reference
    9 report     report: the 256-expert coverage plot and summary
A sampler reads /proc every second: per process PSS (shared pages split among the processes mapping
them, so a sum is the real total) and the kernel's peak RSS (VmHWM) of each vLLM rank worker. It
follows this script's process tree and the two Ray nodes' daemons and workers (found by their temp dirs).
Memory is tight with 16 vLLM workers on 24 GiB: the KV cache is cut with --kv-cache-gib, Ray starts one
idle worker per node and a 200 MB object store, and everything started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from _child import children_by_parent  # benchmarks/ is on sys.path when run as a script

from ray_calib.infer.runner import Server, complete, stop
from ray_calib.testing.localnodes import kill_leftovers, ray_pids, running_sshd, write_conf

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
PROMPT = "The capital of France is"
ANSWER_TOKENS = 8


# ---- memory sampling -----------------------------------------------------------------------------------------


def _tree(roots: list[int], children: dict[int, list[int]]) -> dict[int, int]:
    """pid -> the root it descends from."""
    owner, todo = {}, [(root, root) for root in roots]
    while todo:
        pid, root = todo.pop()
        if pid in owner:
            continue
        owner[pid] = root
        todo += [(child, root) for child in children.get(pid, [])]
    return owner


def _read(pid: int) -> tuple[str, float, float] | None:
    """(command line, PSS MiB, peak RSS MiB) of a live process."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        pss = next(
            int(ln.split()[1])
            for ln in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
            if ln.startswith("Pss:")
        )
        hwm = next(
            int(ln.split()[1]) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmHWM:")
        )
    except (OSError, StopIteration, ValueError):
        return None
    return cmdline, pss / 1024, hwm / 1024


def _kind(cmdline: str) -> str:
    ray_rank = cmdline.startswith(("ray::RayWorkerWrapper", "ray::RayWorkerProc"))  # the actor name by vLLM version
    if ray_rank or "VLLM::Worker" in cmdline or "VllmWorker" in cmdline:
        return "rank worker"
    if "EngineCore" in cmdline:
        return "engine core"
    if "ray_calib.cli" in cmdline or "ray_calib.infer.vllm_cli" in cmdline:
        return "driver"
    if "ray" in cmdline or "raylet" in cmdline or "gcs_server" in cmdline:
        return "ray"
    return "other"


@dataclass
class StageMemory:
    peak_total_mib: float = 0.0  # max over samples of the summed PSS of everything followed
    peak_by_kind_mib: dict[str, float] = field(default_factory=dict)  # max over samples of each kind's PSS sum
    worker_peak_rss_mib: dict[int, float] = field(default_factory=dict)  # pid -> VmHWM
    worker_peak_pss_mib: dict[int, float] = field(default_factory=dict)
    workers_per_node: dict[str, int] = field(default_factory=dict)  # max seen at once
    host_used_peak_mib: float = 0.0  # MemTotal - MemAvailable (includes everyone else on the box)


class Sampler:
    """Samples the memory of what this benchmark started, once a second, into the current stage's record."""

    def __init__(self, ray_temp_dirs: dict[str, Path]) -> None:
        self.ray_temp_dirs = ray_temp_dirs
        self.stage: StageMemory | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _roots(self) -> tuple[list[int], dict[int, str]]:
        node_of = {}
        for node, temp in self.ray_temp_dirs.items():
            for pid in ray_pids(temp):
                node_of[pid] = node
        return [os.getpid(), *node_of], node_of

    def sample(self) -> None:
        stage = self.stage
        if stage is None:
            return
        roots, node_of = self._roots()
        owner = _tree(roots, children_by_parent())
        total, by_kind, per_node = 0.0, {}, {}
        for pid, root in owner.items():
            if pid == os.getpid():
                continue
            read = _read(pid)
            if read is None:
                continue
            cmdline, pss, hwm = read
            kind = _kind(cmdline)
            total += pss
            by_kind[kind] = by_kind.get(kind, 0.0) + pss
            if kind == "rank worker":
                stage.worker_peak_rss_mib[pid] = max(stage.worker_peak_rss_mib.get(pid, 0.0), hwm)
                stage.worker_peak_pss_mib[pid] = max(stage.worker_peak_pss_mib.get(pid, 0.0), pss)
                node = node_of.get(root, "this node (mp)")
                per_node[node] = per_node.get(node, 0) + 1
        stage.peak_total_mib = max(stage.peak_total_mib, total)
        for kind, value in by_kind.items():
            stage.peak_by_kind_mib[kind] = max(stage.peak_by_kind_mib.get(kind, 0.0), value)
        for node, count in per_node.items():
            stage.workers_per_node[node] = max(stage.workers_per_node.get(node, 0), count)
        stage.host_used_peak_mib = max(stage.host_used_peak_mib, _host_used_mib())

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.sample()
            except Exception as err:  # noqa: BLE001 - a sampling hiccup must not end the benchmark
                print(f"    (sampler: {type(err).__name__}: {err})", flush=True)


def _host_used_mib() -> float:
    info = {ln.split(":")[0]: int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()}
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


# ---- stages --------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    seconds: float
    memory: StageMemory
    output: str


class Runner:
    def __init__(self, env: dict[str, str], cwd: Path, sampler: Sampler) -> None:
        self.env, self.cwd, self.sampler = env, cwd, sampler
        self.stages: list[Stage] = []

    def cli(self, name: str, args: list[object], *, check: bool = True) -> Stage:
        """Run one `ray-calib` command as a stage; its output goes to the console and is kept."""
        print(f"\n[{name}] $ ray-calib {' '.join(map(str, args))}", flush=True)
        memory = StageMemory()
        self.sampler.stage = memory
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "ray_calib.cli", *map(str, args)],
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines = []
        for line in process.stdout:
            lines.append(line)
            if not line.startswith(("INFO", "(", "[")) or "ray_calib" in line:
                print("    " + line.rstrip(), flush=True)
        process.wait()
        self.sampler.sample()
        self.sampler.stage = None
        stage = Stage(name, time.perf_counter() - started, memory, "".join(lines))
        self.stages.append(stage)
        print(f"[{name}] {'done' if process.returncode == 0 else 'FAILED'} in {stage.seconds:.1f} s", flush=True)
        if check and process.returncode != 0:
            tail = "".join(lines[-40:])
            raise SystemExit(f"stage {name} failed with exit code {process.returncode}:\n{tail}")
        return stage


def run(root: Path, args: argparse.Namespace) -> dict:
    model, data, run_dir = root / "models" / "tiny-deepseek-r1", root / "data" / "calib.jsonl", root / "run"
    env = {
        **os.environ,
        "RAY_CALIB_RUN_DIR": str(run_dir),
        "PYTHONUNBUFFERED": "1",
        "RAY_CALIB_DEVICE": "cpu",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    cluster_dir = root / "cluster"
    conf_holder: dict[str, Path] = {}
    sampler = Sampler({}).start()
    runner = Runner(env, root, sampler)
    result: dict = {}
    try:
        runner.cli("model", ["make-tiny-model", "--arch", "deepseek_r1", "--out", model, "--force"])
        runner.cli("model", ["make-calib-set", "--format", "pile", "--out", data, "--num-samples", 2 * args.samples])
        with running_sshd() as sshd:
            conf = write_conf(
                cluster_dir,
                sshd,
                gcs_port=args.gcs_port,
                dashboard_port=args.gcs_port + 1900,
                devices_per_node=8,
                num_cpus=1,
                memory="2G",
                fast_failure_detection=False,
            )
            conf_holder["conf"] = conf
            temps = _ray_temp_dirs(conf)
            sampler.ray_temp_dirs = temps
            try:
                runner.cli("up", ["up", "--conf", conf])
                measure = runner.cli(
                    "measure",
                    [
                        "measure",
                        "--conf",
                        conf,
                        "--model",
                        model,
                        "--dataset",
                        data,
                        "--tp",
                        16,
                        "--fp8-kv",
                        "--num-samples",
                        args.samples,
                        "--max-new-tokens",
                        args.new_tokens,
                        "--batch-size",
                        16,
                        "--kv-cache-gib",
                        args.kv_cache_gib,
                        "--max-model-len",
                        512,
                    ],
                )
            finally:
                runner.cli("down", ["down", "--conf", conf], check=False)
                for temp in temps.values():
                    kill_leftovers(temp)
        result["ranks_per_node"] = measure.memory.workers_per_node
        runner.cli("unify", ["unify", "--to-tp", 8])
        runner.cli("quantize", ["quantize", "--low-cpu-mem", "--fp8-kv"])
        prompts = root / "prompt.txt"
        prompts.write_text(PROMPT + "\n")
        runner.cli(
            "reference",
            [
                "infer",
                "--model",
                model,
                "--tp",
                1,
                "--prompts",
                prompts,
                "--max-new-tokens",
                ANSWER_TOKENS,
                "--no-fp8-kv",
                "--kv-cache-gib",
                args.kv_cache_gib,
            ],
        )
        reference = json.loads((run_dir / "infer" / "completions.json").read_text())[0]["text"]
        result["answer"] = _serve_and_ask(runner, run_dir, args, reference)
        runner.cli("report", ["report", run_dir])
        result["coverage_plots"] = sorted(str(p) for p in (run_dir / "report").glob("expert_coverage*.png"))
        result["summary"] = (run_dir / "report" / "summary.txt").read_text()
    finally:
        sampler.stop()
        if "conf" in conf_holder:
            for temp in _ray_temp_dirs(conf_holder["conf"]).values():
                kill_leftovers(temp)
    result["stages"] = runner.stages
    return result


def _serve_and_ask(runner: Runner, run_dir: Path, args: argparse.Namespace, reference: str) -> dict:
    """Serve the FP8 model at TP=8 on this node, ask once through the OpenAI API, compare, stop the server."""
    port = args.gcs_port + 1700
    stage = runner.cli(
        "serve",
        ["infer", "--serve", "--detach", "--tp", 8, "--no-fp8-kv", "--port", port, "--kv-cache-gib", args.kv_cache_gib],
    )
    pid = int(stage.output.rsplit("stop it with: kill ", 1)[1].split()[0])
    settings = [
        line.strip() for line in stage.output.splitlines() if "serving with:" in line or "server reports" in line
    ]
    try:
        server = Server(
            url=f"http://127.0.0.1:{port}", pid=pid, log=run_dir / "infer" / "vllm-serve.log", model_name="fp8"
        )
        runner.sampler.stage = stage.memory
        started = time.perf_counter()
        answer = complete(server, PROMPT, max_tokens=ANSWER_TOKENS, timeout_s=1800)
        runner.sampler.sample()
        seconds = time.perf_counter() - started
    finally:
        runner.sampler.stage = None
        stop(pid)
        _wait_gone(pid)
    same = os.path.commonprefix([answer, reference])
    return {
        "answer": answer,
        "reference": reference,
        "seconds": seconds,
        "settings": settings,
        "first_word_matches": answer.split()[:1] == reference.split()[:1],
        "common_prefix_chars": len(same),
    }


def _wait_gone(pid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(pid, 9)
    except ProcessLookupError:
        pass


def _ray_temp_dirs(conf: Path) -> dict[str, Path]:
    values = dict(
        line.split("=", 1) for line in conf.read_text().splitlines() if "=" in line and not line.startswith("#")
    )
    return {"head": Path(values["HEAD_NODE_RAY_TEMP_DIR"]), "worker": Path(values["WORKER_NODE_RAY_TEMP_DIR"])}


# ---- report --------------------------------------------------------------------------------------------------


def print_report(result: dict, args: argparse.Namespace) -> None:
    stages: list[Stage] = result["stages"]
    print(
        f"\nTP=16 over two nodes -> TP=8 on one: tiny DeepSeek-R1 shape, {args.samples} prompts, "
        f"{args.new_tokens} new tokens, KV cache {args.kv_cache_gib} GiB per rank, {os.cpu_count()} cores, "
        f"host {_host_total_gib():.1f} GiB"
    )
    print(
        f"{'stage':<10} {'wall s':>8} {'peak total PSS MiB':>19} {'workers':>8} {'worker peak RSS MiB (max/mean)':>31} "
        f"{'host used peak MiB':>19}"
    )
    merged: dict[str, list[Stage]] = {}
    for stage in stages:
        merged.setdefault(stage.name, []).append(stage)
    for name, group in merged.items():
        seconds = sum(s.seconds for s in group)
        peak = max(s.memory.peak_total_mib for s in group)
        rss = [v for s in group for v in s.memory.worker_peak_rss_mib.values()]
        workers = f"{len(rss)}" if rss else "-"
        per_worker = f"{max(rss):.0f} / {sum(rss) / len(rss):.0f}" if rss else "-"
        host = max(s.memory.host_used_peak_mib for s in group)
        print(f"{name:<10} {seconds:>8.1f} {peak:>19.0f} {workers:>8} {per_worker:>31} {host:>19.0f}")
    print(f"{'total':<10} {sum(s.seconds for s in stages):>8.1f}")
    for name in ("measure", "serve"):
        for stage in merged.get(name, []):
            pss = list(stage.memory.worker_peak_pss_mib.values())
            kinds = ", ".join(f"{k} {v:.0f}" for k, v in sorted(stage.memory.peak_by_kind_mib.items()))
            if pss:
                print(
                    f"{name}: worker peak PSS max {max(pss):.0f} / mean {sum(pss) / len(pss):.0f} MiB; "
                    f"peak PSS by kind (MiB): {kinds}"
                )
    print(f"ranks per node during measure: {result.get('ranks_per_node')}")
    answer = result.get("answer", {})
    for line in answer.get("settings", []):
        print(line)
    print(
        f"served FP8 TP=8 answer to {PROMPT!r}: {answer.get('answer')!r} in {answer.get('seconds', 0):.2f} s; "
        f"BF16 TP=1 reference {answer.get('reference')!r}; first word matches: {answer.get('first_word_matches')}, "
        f"common prefix {answer.get('common_prefix_chars')} chars"
    )
    print(result.get("summary", "").strip())
    for plot in result.get("coverage_plots", []):
        print(f"coverage plot: {plot}")


def _host_total_gib() -> float:
    line = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal:"))
    return int(line.split()[1]) / (1 << 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32, help="calibration prompts measured")
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy tokens generated per prompt")
    parser.add_argument("--kv-cache-gib", type=float, default=0.125, help="CPU KV cache per rank")
    parser.add_argument("--gcs-port", type=int, default=6420, help="Ray GCS port (dashboard, server: +1900, +1700)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run here (default: a temp dir, removed)")
    args = parser.parse_args()
    root = args.keep.absolute() if args.keep else Path(tempfile.mkdtemp(prefix="bench-tp16-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        result = run(root, args)
        print_report(result, args)
        answer = result["answer"]
        if not answer["answer"].strip():
            raise SystemExit("the served model gave an empty answer")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
