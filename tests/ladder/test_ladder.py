"""`ray-calib ladder`: each rung passes on the two local nodes and fails for the reason it exists."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ray_calib.ladder import nodes
from ray_calib.ladder.inc_tp2 import check_rank_files
from ray_calib.ladder.nodes import NodeModel, check_memory, check_models
from ray_calib.ladder.run import LadderContext, Rung, RungFailed, run_ladder
from ray_calib.testing.localnodes import HEAD_IP, WORKER_IP, ray_pids, write_conf


def probe_locally(model) -> NodeModel:
    """The rung's own node probe, run here as SSH runs it on a node."""
    out = subprocess.run(
        [sys.executable, "-c", nodes._PROBE, str(model), nodes._MARK], capture_output=True, text=True, check=True
    ).stdout
    facts = json.loads(out.strip().removeprefix(nodes._MARK))
    return NodeModel("probe", facts["model"], facts["mem_available"], facts["hbm_free"])


def test_another_copy_of_the_model_on_a_node_fails_rung_a(tmp_path, tiny_model):
    source = tiny_model("llama")
    head = probe_locally(source)
    assert head.digest and head.mem_available and head.hbm_free is None  # no hl-smi here
    other = tmp_path / "other"
    other.mkdir()
    for path in source.iterdir():
        (other / path.name).symlink_to(path)
    assert probe_locally(other).digest == head.digest  # the same files at another place: the same model
    (other / "config.json").unlink()
    config = json.loads((source / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    worker = NodeModel("worker1 (127.0.0.2)", probe_locally(other).digest, head.mem_available, None)
    with pytest.raises(RungFailed, match=r"worker1 \(127.0.0.2\): .* differs from the head's copy") as failed:
        check_models([head, worker], str(source))
    assert "copy the head's" in failed.value.fix
    missing = NodeModel("worker1 (127.0.0.2)", probe_locally(tmp_path / "nowhere").digest, None, None)
    with pytest.raises(RungFailed, match="no config.json under"):
        check_models([head, missing], str(source))


def test_a_card_held_by_another_process_fails_rung_a():
    free = [90 << 30] * 8
    ok = [NodeModel("head", "d", 500 << 30, free), NodeModel("worker1", "d", 400 << 30, free)]
    assert check_memory(ok) == "RAM available >= 400 GiB per node, HBM free >= 90 GiB per card"
    busy = [ok[0], NodeModel("worker1", "d", 400 << 30, [*free[:3], 20 << 30, *free[4:]])]
    with pytest.raises(RungFailed, match="worker1: card 3 has 20.0 GiB HBM free, the freest card 90.0 GiB"):
        check_memory(busy)


def test_the_ladder_stops_at_the_first_failing_rung(tmp_path):
    ran = []

    def passes(context):
        ran.append("a")
        return "fine"

    def fails(context):
        ran.append("b")
        raise RungFailed("worker1", "no rank file _1_2", fix="look at the rank's log")

    rungs = [Rung("a", "one", "", passes), Rung("b", "two", "", fails), Rung("c", "three", "", passes)]
    results = run_ladder(rungs, LadderContext(tmp_path / "devices.conf", None, tmp_path))
    assert ran == ["a", "b"] and [r.ok for r in results] == [True, False]
    assert results[1].result == "worker1: no rank file _1_2" and results[1].fix == "look at the rank's log"


def test_unknown_rungs_are_refused(run_cli, tmp_path):
    result = run_cli("ladder", "--conf", tmp_path / "devices.conf", "--rungs", "z", "--run-dir", tmp_path)
    assert result.exit_code == 2 and "--rungs z: no rung z" in result.stderr


def test_rank_files_must_be_one_per_rank_named_by_global_rank(tmp_path):
    from ray_calib.inc import RankFile, StatsName, write_rank_file
    from ray_calib.inc.naming import MEASURE_PREFIX

    def rank(r: int, world: int) -> None:
        nodes = {"model.layers.0.mlp.down_proj": {"inputs": [[[1.0]]], "params": {"weight": [[0.5]]}}}
        write_rank_file(RankFile(name=StatsName(MEASURE_PREFIX, rank=r, world_size=world), nodes=nodes), tmp_path)

    rank(0, 2)
    with pytest.raises(RungFailed, match=r"head: no complete rank file for rank\(s\) 1 of 2 .*found ranks \[0\]"):
        check_rank_files(tmp_path, 2, "head")
    rank(1, 2)
    assert "one rank file per rank (_0_2 .. _1_2)" in check_rank_files(tmp_path, 2, "head")
    rank(0, 1)  # a rank that named itself by its node-local world (INC <= 3.4 read LOCAL_RANK at import)
    with pytest.raises(RungFailed, match="not a file per rank named _<rank>_2"):
        check_rank_files(tmp_path, 2, "head")


def ladder_conf(workdir, sshd, name: str, **options):
    return write_conf(workdir / name, sshd, extra=f"WORK_DIR={workdir}\n", **options)


@pytest.mark.cluster
def test_version_skew_fails_rung_a_naming_the_host(workdir, sshd, run_cli, tiny_model, tmp_path):
    """Over real SSH to the two local node addresses the worker's env puts another vLLM first on its path (what a
    node with another image looks like): rung a fails naming that host, the versions and the fix."""
    fake = workdir / "fake-site"
    (fake / "vllm-0.0.1.dist-info").mkdir(parents=True)
    (fake / "vllm-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.0.1\n")
    skewed = ladder_conf(workdir, sshd, "skew", worker_env=f'export PYTHONPATH="{fake}"\n')
    result = run_cli("ladder", "--conf", skewed, "-m", tiny_model("llama"), "--run-dir", tmp_path / "run")
    assert result.exit_code == 1
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert error.startswith(f"error: ladder rung a nodes: worker1 ({WORKER_IP}): vllm 0.0.1 != head ")
    assert "install the head's versions on that host" in error
    table = (tmp_path / "run" / "ladder" / "ladder.txt").read_text()
    assert f"FAILED: worker1 ({WORKER_IP})" in table and "b inc-tp2" not in table  # stopped at rung a
    assert ray_pids(workdir) == []  # rung a starts no Ray process


@pytest.mark.cluster
@pytest.mark.slow  # ~4 min: b and d start vLLM at TP 2, e and f at TP 1
def test_ladder_green_on_the_two_local_nodes(workdir, sshd, run_cli, tiny_model, tmp_path):
    """Every rung, for real: SSH to both nodes, INC MEASURE in vLLM's CPU workers at TP 2, one all-reduce across
    both nodes (the engine over Ray needs `up`: the demo runs that half), a tiny MoE measured expert parallel,
    rung b's measurements unified to TP 1 and loaded by INC QUANTIZE, and as a Gaudi2 compressed-tensors
    checkpoint that vLLM loads and generates with."""
    conf = ladder_conf(workdir, sshd, "green")
    result = run_cli("ladder", "--conf", conf, "-m", tiny_model("llama"), "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.stderr + result.stdout
    assert "ok: 2 nodes like the head" in result.stdout and "ok: INC MEASURE at TP 2" in result.stdout
    assert "ok: all-reduce of 2 nodes (gloo)" in result.stdout
    assert "ok: MoE at TP 2 with EP 2: 4 of 8 experts per rank, ep_size 2 in the meta" in result.stdout
    assert "ok: TP 2 files unified to TP 1, loaded by INC QUANTIZE in vLLM's CPU workers (" in result.stdout
    assert "ok: fp8-gaudi2 (gaudi2) loaded by vLLM on CPU, generated 4 tokens" in result.stdout
    table = (tmp_path / "run" / "ladder" / "ladder.txt").read_text()
    assert table.startswith("rung") and "seconds" in table and "b inc-tp2" in table
    assert [r["ok"] for r in json.loads((tmp_path / "run" / "ladder" / "ladder.json").read_text())] == [True] * 6
    from ray_calib.inc import read_meta

    meta = read_meta(tmp_path / "run" / "ladder" / "b-inc-tp2" / "measure")
    assert meta.extra["backend"] == "inc" and meta.tp_size == 2
    # a real measure prints the plan's warnings, not only --dry-run
    log = (tmp_path / "run" / "ladder" / "b-inc-tp2" / "measure.log").read_text()
    assert "warning: INC runs in vLLM's CPU workers (RAY_CALIB_INC_ON_CPU=1)" in log


@pytest.mark.cluster
def test_measure_ladder_stops_before_measuring(workdir, sshd, run_cli, tiny_model, tmp_path):
    fake = workdir / "fake-site"
    (fake / "ray-0.0.1.dist-info").mkdir(parents=True)
    (fake / "ray-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: ray\nVersion: 0.0.1\n")
    skewed = ladder_conf(workdir, sshd, "skew", worker_env=f'export PYTHONPATH="{fake}"\n')
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"text": "hello world"}\n')
    run = tmp_path / "run"
    result = run_cli("measure", "--ladder", "--conf", skewed, "-m", tiny_model("llama"), "-d", calib, "--run-dir", run)
    assert result.exit_code == 1 and "ray 0.0.1 != head" in result.stderr
    assert (run / "ladder" / "ladder.txt").is_file() and not (run / "measure").exists()


@pytest.mark.cluster
def test_rung_c_all_reduces_over_the_nic_and_a_wrong_nic_fails_it(workdir, sshd, run_cli, tmp_path, monkeypatch):
    """Two processes, one per node over real SSH, all-reduce with gloo over `lo`; a NIC the worker does not have
    fails rung c naming the worker and the NIC (rung a would refuse it first: run alone with --rungs c)."""
    conf = ladder_conf(workdir, sshd, "nic")
    result = run_cli("ladder", "--conf", conf, "--rungs", "c", "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    assert f"ok: all-reduce of 2 nodes (gloo) gave 3 on each, over head ({HEAD_IP}) lo" in result.stdout
    assert "the engine over Ray not run: devices.conf's cluster is not up (`ray-calib up`)" in result.stdout
    from ray_calib.ladder import allreduce

    monkeypatch.setattr(allreduce, "JOIN_TIMEOUT_S", 15)  # the head waits this long for the worker that failed
    conf.write_text(conf.read_text().replace("WORKER_NODE_IFNAME=lo", "WORKER_NODE_IFNAME=bogus0"))
    result = run_cli("ladder", "--conf", conf, "--rungs", "c", "--run-dir", tmp_path / "run")
    assert result.exit_code == 1
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert error.startswith(f"error: ladder rung c all-reduce: worker1 ({WORKER_IP}): all-reduce failed: ")
    assert f"(gloo, IFNAME bogus0, head {HEAD_IP})" in error and "check that bogus0 exists on that node" in error


@pytest.mark.cluster
def test_rung_f_needs_rung_b_first(workdir, sshd, run_cli, tmp_path):
    conf = ladder_conf(workdir, sshd, "f-alone")
    result = run_cli("ladder", "--conf", conf, "--rungs", "f", "--run-dir", tmp_path / "run")
    assert (
        result.exit_code == 1
        and f"ladder rung f compressed-tensors: head ({HEAD_IP}): no measurements of rung b" in (result.stderr)
    )


def one_node_conf(tmp_path):
    """A devices.conf of this machine's two local node addresses (rungs b, e and f run on the head alone)."""
    for name in ("head.sh", "worker.sh"):
        (tmp_path / name).write_text("")
    conf = tmp_path / "devices.conf"
    conf.write_text(
        f"HEAD_NODE_IP={HEAD_IP}\nHEAD_NODE_IFNAME=lo\nHEAD_NODE_SOURCE_FILENAME=head.sh\n"
        f"WORKER_NODE_IP={WORKER_IP}\nWORKER_NODE_IFNAME=lo\nWORKER_NODE_SOURCE_FILENAME=worker.sh\n"
        "DEVICE_KIND=cpu\nDEVICES_PER_NODE=2\n"
    )
    return conf


def test_rung_e_needs_rung_b_first(tmp_path, run_cli):
    result = run_cli("ladder", "--conf", one_node_conf(tmp_path), "--rungs", "e", "--run-dir", tmp_path / "run")
    assert result.exit_code == 1
    assert f"ladder rung e inc-quantize: head ({HEAD_IP}): no measurements of rung b" in result.stderr


@pytest.mark.slow
def test_rung_e_fails_on_unified_files_inc_cannot_quantize_with(tmp_path, run_cli, tiny_model):
    """Rank files that unify cleanly but that INC's QUANTIZE cannot use (here: our test writer's, which lack
    fields INC reads) fail rung e in under a minute, naming INC, instead of at the first serve of the real job."""
    from tests.convert.synthetic import write_measurements

    rung_b = tmp_path / "run" / "ladder" / "b-inc-tp2"
    model = rung_b / "tiny-llama"
    rung_b.mkdir(parents=True)
    model.symlink_to(tiny_model("llama"), target_is_directory=True)
    write_measurements(rung_b / "measure", model, world_size=2, device_type="cpu")
    result = run_cli("ladder", "--conf", one_node_conf(tmp_path), "--rungs", "e", "--run-dir", tmp_path / "run")
    assert result.exit_code == 1, result.stdout
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert error.startswith(f"error: ladder rung e inc-quantize: head ({HEAD_IP}): INC QUANTIZE of the unified files")
    assert (tmp_path / "run" / "ladder" / "e-inc-quantize" / "unified-tp1").is_dir()  # unify itself passed


@pytest.mark.slow
def test_rung_d_needs_each_rank_to_hold_its_own_experts(tmp_path, run_cli, monkeypatch):
    """Rung d for real on the tiny DeepSeek at TP 2: with expert parallelism each rank dumps 4 of the 8 routed
    experts and unify gives back all 8. An engine that runs the experts TP-sharded though EP was asked (here:
    measure asked without it) leaves all 8 on every rank and fails the rung. After unify both runs give every
    expert the same weight range (max |W| of the same bf16 weights: exact on any kernel), which a wrong global
    expert id would not (it pairs an expert with another's weights). Input ranges are not compared: the engine
    batches the prompts as it likes, a bf16 rounding of another batch shape moves a near-tie of the random
    router, and a token goes to another expert in one of the runs."""
    from ray_calib.inc.runset import MeasurementSet
    from ray_calib.ladder import inc_ep
    from ray_calib.measurements.pipeline import unify_dir

    conf = one_node_conf(tmp_path)
    work = tmp_path / "run" / "ladder" / "d-inc-ep"
    monkeypatch.setattr(inc_ep, "EP_FLAG", "--no-expert-parallel")
    result = run_cli("ladder", "--conf", conf, "--rungs", "d", "--run-dir", tmp_path / "run")
    assert result.exit_code == 1, result.stdout
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert error.startswith(f"error: ladder rung d inc-ep: head ({HEAD_IP}): with --no-expert-parallel at TP 2, ")
    assert "ranks hold [8, 8] of 8 routed experts (all of them: the engine ran TP-sharded experts)" in error
    sharded = tmp_path / "tp-sharded"
    (work / "measure").rename(tmp_path / "tp-measure")
    unify_dir(tmp_path / "tp-measure", sharded, 1)

    monkeypatch.undo()
    result = run_cli("ladder", "--conf", conf, "--rungs", "d", "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    assert "ok: MoE at TP 2 with EP 2: 4 of 8 experts per rank, ep_size 2 in the meta, unified to TP 1 with all 8" in (
        result.stdout
    )
    ep = MeasurementSet.discover(work / "unified").read(0).nodes
    tp = MeasurementSet.discover(sharded).read(0).nodes
    experts = [name for name in tp if ".w13_list." in name or ".w2_list." in name]
    assert len(experts) == 3 * 2 * 8 and set(experts) <= set(ep)  # 3 MoE layers x (w13, w2) x 8 experts
    for name in experts:
        assert ep[name]["params"] == tp[name]["params"], name
