"""push/pull through the real huggingface_hub client against the local Hub stand-in (a TEST STAND-IN)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from ray_calib.cli import cli
from ray_calib.errors import HubError, OutputExistsError
from ray_calib.hub.transfer import pull, push
from ray_calib.inc import RankFile, RunMeta, StatsName, write_meta, write_rank_file
from ray_calib.inc.naming import MEASURE_PREFIX
from ray_calib.inc.quant_config import read_config, template_set, write_configs
from ray_calib.rundir import RunDir
from ray_calib.runrecord import checkpoint_digest
from ray_calib.testing.hub_standin import DEFAULT_TOKEN, StandinHub

REPO = "standin/tiny-ds3-calib"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = StandinHub(tmp_path_factory.mktemp("hub")).start()
    yield server
    server.stop()


@pytest.fixture
def hub_env(hub, monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", DEFAULT_TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the stand-in speaks plain LFS only
    return hub


def _make_run(root: Path) -> RunDir:
    run = RunDir(root)
    for rank in range(2):
        nodes = {"model.layers.0.self_attn.o_proj": {"inputs": [[[0.5 + rank]]], "params": {"weight": [[0.25]]}}}
        write_rank_file(RankFile(name=StatsName(MEASURE_PREFIX, rank=rank, world_size=2), nodes=nodes), run.measure)
    write_meta(
        run.measure,
        RunMeta(
            device_type="cpu",
            model="tiny/ds3",
            revision="abc123",
            dataset="pile.jsonl",
            dataset_hash="f" * 64,
            num_samples=32,
            num_tokens=2048,
            tp_size=2,
            ep_size=1,
            observer="maxabs",
            fp8_kv=True,
        ),
    )
    write_rank_file(
        RankFile(name=StatsName(MEASURE_PREFIX, rank=0, world_size=1), nodes={"x": {"inputs": [[[1.5]]]}}),
        run.unified(1),
    )
    write_configs(run.configs, template_set(str(run.measure), str(run.unified(1)), moe=True))
    run.report.mkdir()
    (run.report / "plot.png").write_bytes(bytes(range(256)) * 400)  # binary and > 64 KiB: goes through LFS
    (run.fp8).mkdir()
    (run.fp8 / "model.safetensors").write_bytes(b"\0" * 1000)
    run.fp8_for("gaudi2").mkdir()
    (run.fp8_for("gaudi2") / "model.safetensors").write_bytes(b"\1" * 1000)
    verdict = {"candidate_digest": checkpoint_digest(run.fp8), "min_agreement": 0.9, "worst_agreement": 0.9375}
    (run.root / "eval.json").write_text(
        json.dumps(
            {
                "num_texts": 8,
                "top1_agreement": {"candidate": 0.9375},
                "mean_kl": {"candidate": 0.0123},
                "baseline": "bf16",
                "verdict": {**verdict, "candidate": str(run.fp8), "passed": True, "dropped_scales": 0},
                "scale_audit": {
                    "candidate_fp8_kv": {
                        "counts": {"weight": {"carried": 16, "in_use": 16}, "kv": {"carried": 4, "in_use": 4}},
                        "dropped": [],
                        "backends": ["CPUAttentionBackendImpl"],
                    }
                },
            }
        )
    )
    (run.unified(1) / "hessians.safetensors").write_bytes(b"\0" * 1000)  # GPTQ's inputs: with the checkpoint only
    (run.root / ".ray-calib-stage-x").mkdir()
    for local in ("logs/measure.log", "infer/vllm-serve.log", "ladder/ladder.txt"):  # this machine's records
        (run.root / local).parent.mkdir(exist_ok=True)
        (run.root / local).write_text("node-17.internal\n")
    return run


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.relative_to(root).parts[0].startswith(".")
    }


def test_push_then_pull_round_trips_every_file(hub_env, tmp_path):
    run = _make_run(tmp_path / "run")
    (run.root / "report" / "__pycache__").mkdir()
    (run.root / "report" / "__pycache__" / "x.pyc").write_bytes(b"x")  # skipped, and not counted as pushed
    result = push(run, REPO)
    assert "fp8/model.safetensors" not in result.files and "report/plot.png" in result.files
    assert "fp8-gaudi2/model.safetensors" not in result.files
    assert "unified-tp1/hessians.safetensors" not in result.files
    assert not any("__pycache__" in f for f in result.files)
    shutil.rmtree(run.root / "report" / "__pycache__")
    pulled = pull(REPO, tmp_path / "pulled")
    assert not any(f.startswith(("logs/", "infer/", "ladder/")) for f in result.files)
    local = ("fp8", "logs/", "infer/", "ladder/")
    sent = {k: v for k, v in _tree(run.root).items() if not k.startswith(local) and "hessians" not in k}
    got = _tree(pulled.directory)
    configs = {k for k in sent if k.startswith("configs/")}
    assert {k: v for k, v in got.items() if k not in configs} == {k: v for k, v in sent.items() if k not in configs}
    # pulling again over those files needs --force (a pull must not silently mix two runs)
    with pytest.raises(OutputExistsError, match="already holds .* pass --force"):
        pull(REPO, tmp_path / "pulled")
    assert pull(REPO, tmp_path / "pulled", force=True).files
    assert set(got) == set(sent)
    # configs come back pointing at the pulled directories
    one_node = read_config(pulled.directory / "configs" / "inc_quant_with_fp8kv_one_node_config.json")
    assert one_node["dump_stats_path"] == str(pulled.directory / "unified-tp1" / MEASURE_PREFIX)
    assert "inc_quant_with_fp8kv_one_node_config.json" in pulled.configs_rewritten
    stored = json.loads(hub_env.repo_file("model", REPO).read_text())
    assert stored["files"]["report/plot.png"]["lfs"] and not stored["files"]["eval.json"]["lfs"]


def test_checkpoint_only_with_the_flag_and_unchanged_push_is_a_no_op(hub_env, tmp_path):
    run = _make_run(tmp_path / "run")
    push(run, "standin/with-ckpt", include_checkpoint=True)
    sha = json.loads(hub_env.repo_file("model", "standin/with-ckpt").read_text())["sha"]
    push(run, "standin/with-ckpt", include_checkpoint=True)
    stored = json.loads(hub_env.repo_file("model", "standin/with-ckpt").read_text())
    assert "fp8/model.safetensors" in stored["files"] and stored["sha"] == sha
    assert "fp8-gaudi2/model.safetensors" in stored["files"]
    assert "unified-tp1/hessians.safetensors" in stored["files"]
    card = (pull("standin/with-ckpt", tmp_path / "p").directory / "README.md").read_text()
    assert "- `fp8/`: the FP8 checkpoint for CPU/CUDA" in card
    assert "- `fp8-gaudi2/`: the FP8 checkpoint for Gaudi2" in card and "float8_e4m3fnuz" in card
    assert "keeps only the maximum of a layer's gate/up input scales" in card


def test_model_card_states_the_run(hub_env, tmp_path):
    run = _make_run(tmp_path / "run")
    push(run, REPO)
    card = (pull(REPO, tmp_path / "p").directory / "README.md").read_text()
    for row in (
        "| Model | tiny/ds3 |",
        "| Revision | abc123 |",
        "| Device | cpu |",
        "| Dataset | pile.jsonl |",
        "| Samples | 32 |",
        "| Tokens | 2048 |",
        "| Measured at TP / EP | 2 / 1 |",
        "| Unified to TP | 1 |",
        "| Scale method | maxabs_hw |",
        "| top1_agreement (candidate) | 0.9375 |",
        "| mean_kl (candidate) | 0.0123 |",
        "| num_texts | 8 |",
        "- candidate_fp8_kv: 16/16 weight, 4/4 kv scales in use, 0 dropped",
        "Verified: `ray-calib eval` top-1 agreement 0.9375 >= --min-agreement 0.9 on this checkpoint.",
    ):
        assert row in card, row
    assert card.startswith("---\nbase_model: tiny/ds3\n") and "`fp8/`" not in card and "`fp8-gaudi2/`" not in card
    assert "`logs/`" not in card and "`ladder/`" not in card


def test_model_card_survives_missing_meta_and_garbage_eval(tmp_path):
    from ray_calib.hub.card import build_card

    run = RunDir(tmp_path)
    (tmp_path / "eval.json").write_text("[1, 2")
    card = build_card(run, "org/x")
    assert "| Model | n/a |" in card and "No evaluation was recorded" in card


def test_no_token_is_one_line(hub_env, monkeypatch, tmp_path, capsys):
    from ray_calib.cli import main

    monkeypatch.delenv("HF_TOKEN")
    run = _make_run(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        main(["push", "--repo", REPO, "--run-dir", str(run.root)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1
    assert err.startswith("error: no Hugging Face token found") and "HF_TOKEN" in err


def test_other_clients_get_a_clear_xet_refusal(hub_env, tmp_path, monkeypatch):
    pytest.importorskip("hf_xet", reason="without hf_xet huggingface_hub uses plain LFS, which the stand-in speaks")
    import huggingface_hub.constants as constants
    from huggingface_hub import HfApi

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)  # a client that did not set CLIENT_ENV

    api = HfApi(endpoint=hub_env.url, token=DEFAULT_TOKEN)
    api.create_repo("standin/xet", exist_ok=True)
    run = _make_run(tmp_path / "run")
    with pytest.raises(Exception, match="501"):  # plain huggingface_hub with hf_xet installed
        api.upload_folder(repo_id="standin/xet", folder_path=str(run.report))


def test_wrong_token_is_rejected_without_printing_it(hub_env, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_secret_value")
    with pytest.raises(HubError, match="rejected the token") as info:
        push(_make_run(tmp_path / "run"), REPO)
    assert "hf_wrong_secret_value" not in str(info.value)


def test_repo_not_found_is_one_line(hub_env, tmp_path):
    with pytest.raises(HubError, match=r"^repo standin/does-not-exist not found at http://127\.0\.0\.1:\d+") as info:
        pull("standin/does-not-exist", tmp_path / "p")
    assert "\n" not in str(info.value)
    assert not any((tmp_path / "p").iterdir())  # nothing half-pulled


def test_no_network_is_one_line(hub_env, monkeypatch, tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    with pytest.raises(HubError, match=r"cannot reach the hub at http://127\.0\.0\.1:\d+ \(ConnectError\)"):
        push(_make_run(tmp_path / "run"), REPO)
    with pytest.raises(HubError, match="cannot reach the hub"):
        pull(REPO, tmp_path / "p")


def test_cli_push_pull_and_nothing_to_push(hub_env, tmp_path):
    run = _make_run(tmp_path / "run")
    runner = CliRunner()
    result = runner.invoke(cli, ["push", "--repo", "standin/cli", "--run-dir", str(run.root), "--private"])
    assert result.exit_code == 0, result.output
    assert "pushed" in result.output and DEFAULT_TOKEN not in result.output
    assert json.loads(hub_env.repo_file("model", "standin/cli").read_text())["private"] is True
    result = runner.invoke(cli, ["pull", "--repo", "standin/cli", "--out", str(tmp_path / "back")])
    assert result.exit_code == 0 and (tmp_path / "back" / "measure" / "ray_calib_meta.json").exists()
    (tmp_path / "empty").mkdir()
    result = runner.invoke(cli, ["push", "--repo", "standin/cli", "--run-dir", str(tmp_path / "empty")])
    assert result.exit_code != 0 and "nothing to push" in str(result.exception)


def test_invalid_repo_id_is_one_line_and_writes_nothing(hub_env, tmp_path):
    run = _make_run(tmp_path / "run")
    for call in (lambda: push(run, "bad repo!!/x y"), lambda: pull("a/b/c", tmp_path / "p")):
        with pytest.raises(HubError, match="is not a valid repo id.*ORG/NAME"):
            call()
    assert not (run.root / "README.md").exists() and not (tmp_path / "p").exists()


def test_push_publishes_only_a_checked_run(hub_env, tmp_path):
    """A passed eval of the checkpoint as it is now, or --no-verify (said in the card); logs/ and infer/ stay."""
    from ray_calib.errors import ConfigError

    run = _make_run(tmp_path / "run")
    (run.root / "logs").mkdir(exist_ok=True)  # _make_run writes local records too
    (run.root / "logs" / "infer.log").write_text("vLLM on host-1\n")
    (run.root / "infer").mkdir(exist_ok=True)
    (run.root / "infer" / "completions.json").write_text("[]")
    (run.fp8 / "model.safetensors").write_bytes(b"\1" * 1001)  # quantized again after the eval
    with pytest.raises(ConfigError, match="not the checkpoint in .* as it is now") as err:
        push(run, "standin/checked")
    assert "--no-verify" in (err.value.fix or "")
    data = json.loads(run.eval_json.read_text())
    for verdict, message in (
        ({**data["verdict"], "passed": False, "worst_agreement": 0.5}, "failed its threshold"),
        ({**data["verdict"], "min_agreement": None}, "had no --min-agreement"),
        ({**data["verdict"], "dropped_scales": 1, "allow_scale_loss": True}, "left 1 calibrated scale"),
        (None, "holds no verdict"),
    ):
        run.eval_json.write_text(json.dumps({**data, "verdict": verdict}))
        with pytest.raises(ConfigError, match=message):
            push(run, "standin/checked")
    run.eval_json.unlink()
    with pytest.raises(ConfigError, match="no eval.json"):
        push(run, "standin/checked")
    result = push(run, "standin/checked", verify=False)
    assert not [f for f in result.files if f.startswith(("logs/", "infer/"))]
    card = (pull("standin/checked", tmp_path / "p").directory / "README.md").read_text()
    assert "Not verified: pushed with `--no-verify`" in card and "`logs/`" not in card
    assert not (tmp_path / "p" / "logs").exists() and not (tmp_path / "p" / "infer").exists()
