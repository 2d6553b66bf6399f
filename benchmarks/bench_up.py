"""`ray-calib up` for two local nodes vs the plain `ray start` head + worker sequence (target <= 1.3x).

Both sides start the same two Ray nodes (127.0.0.3 head, 127.0.0.4 worker, same flags, token auth on).
`ray-calib up` also connects over SSH (a private sshd on loopback), runs the preflight on both hosts,
copies the token, stops stale Ray and waits for the health gate. Rounds alternate to share the noise of
this shared box; the ratio uses the medians.

    python benchmarks/bench_up.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _child import run_child  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ray_calib.cluster import devices  # noqa: E402
from ray_calib.cluster.lifecycle import ensure_token  # noqa: E402
from ray_calib.cluster.ray_nodes import start_args, stop_script  # noqa: E402
from ray_calib.testing.localnodes import kill_leftovers, running_sshd, write_conf  # noqa: E402

CLI = [sys.executable, "-m", "ray_calib.cli"]


def plain_start(config: devices.ClusterConfig, env: dict[str, str]) -> tuple[float, int]:
    """`ray start --head ...` then `ray start --address ...`: what the seeds type by hand."""
    total, peak = 0.0, 0
    for node in config.nodes:
        node_env = {**env, "VLLM_HOST_IP": node.ip, "GLOO_SOCKET_IFNAME": node.ifname or ""}
        seconds, rss, _ = run_child(
            [sys.executable, "-m", "ray.scripts.scripts", *start_args(node, config)], env=node_env
        )
        total, peak = total + seconds, max(peak, rss)
    return total, peak


def plain_stop(config: devices.ClusterConfig) -> None:
    for node in config.nodes:
        subprocess.run(["bash", "-c", stop_script(node, config)], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    rounds = parser.parse_args().rounds
    work = Path(tempfile.mkdtemp(prefix="rc-cluster-bench-", dir="/tmp"))
    env = {**os.environ, "RAY_CALIB_STATE_DIR": str(work / "state"), "PYTHONPATH": str(REPO)}
    plain, ours, rss_plain, rss_ours = [], [], 0, 0
    try:
        with running_sshd() as sshd:
            conf = write_conf(work, sshd)
            config = devices.load(conf)
            ensure_token(config.token_path)
            ray_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": config.token_path}
            for index in range(rounds):
                seconds, rss = plain_start(config, ray_env)
                plain.append(seconds)
                rss_plain = max(rss_plain, rss)
                plain_stop(config)
                seconds, rss, _ = run_child([*CLI, "up", "--conf", str(conf)], env=env)
                ours.append(seconds)
                rss_ours = max(rss_ours, rss)
                run_child([*CLI, "down", "--conf", str(conf)], env=env)
                print(
                    f"round {index + 1}: plain ray start {plain[-1]:.1f} s, ray-calib up {ours[-1]:.1f} s", flush=True
                )
    finally:
        kill_leftovers(work)
        shutil.rmtree(work, ignore_errors=True)
    base, mine = statistics.median(plain), statistics.median(ours)
    print(f"plain `ray start` head+worker: median {base:.1f} s (min {min(plain):.1f}), peak RSS {rss_plain:.0f} MiB")
    print(
        f"`ray-calib up` (ssh+preflight+token+start+health): median {mine:.1f} s (min {min(ours):.1f}), "
        f"peak RSS {rss_ours:.0f} MiB"
    )
    print(f"ratio up / plain: {mine / base:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
