"""Calibration data: every format on real files, the allow-list unpickler, and each bad input."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from click.testing import CliRunner

from ray_calib.cli import cli
from ray_calib.data import load_prompts, validation_prompts
from ray_calib.errors import DataError
from ray_calib.testing.tiny import corpus
from ray_calib.testing.tiny.calibset import make_calib_set

TEXTS = [*corpus.paragraphs(40, seed=3), "", "Short one."]


@pytest.fixture(scope="module")
def tokenizer():
    from ray_calib.testing.tiny.tokenizer import train_tokenizer

    return train_tokenizer(1024, num_paragraphs=500)


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    """The same vocabulary without a chat template: prompts fall back to "{system}. {question}"."""
    import copy

    clone = copy.deepcopy(tokenizer)
    clone.chat_template = None
    return clone


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_least_tokens_drops_short_truncates_long_and_reports_it(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "pile.jsonl", [{"text": t, "meta": 1} for t in TEXTS])
    lengths = [len(tokenizer(t)["input_ids"]) for t in TEXTS if t]
    least = sorted(lengths)[len(lengths) // 2]
    calib = load_prompts(path, tokenizer, num_samples=1000, least_tokens=least)
    short = sum(n < least for n in lengths)
    assert calib.report.dropped == {"empty or not text": 1, f"shorter than {least} tokens": short}
    assert calib.report.kept == len(lengths) - short == len(calib.prompts)
    assert calib.report.read == len(TEXTS) and calib.report.unused == 0
    assert all(len(ids) == least for ids in calib.token_ids)
    assert calib.report.num_tokens == least * calib.report.kept
    assert all(ids[0] == tokenizer.bos_token_id for ids in calib.token_ids)


def test_num_samples_stops_early_and_the_shuffle_is_seeded(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "pile.jsonl", [{"text": t} for t in TEXTS])
    first = load_prompts(path, tokenizer, num_samples=5)
    again = load_prompts(path, tokenizer, num_samples=5)
    other = load_prompts(path, tokenizer, num_samples=5, seed=7)
    assert first.report.kept == 5 and first.report.unused == len(TEXTS) - first.report.examined > 0
    assert first.dataset_hash == again.dataset_hash and first.texts == again.texts
    assert other.dataset_hash != first.dataset_hash
    assert first.texts != [t for t in TEXTS if t][:5]  # shuffled, not file order


def test_the_validation_split_is_the_prompts_the_measurement_never_saw(tmp_path, tokenizer):
    """quantize's k/v choice scores passages taken right after the calibration ones, with the same filters;
    none of them was calibrated on, and a changed file gives no split rather than an overlapping one."""
    path = _jsonl(tmp_path / "pile.jsonl", [{"text": t} for t in TEXTS])
    calib = load_prompts(path, tokenizer, num_samples=10, least_tokens=20)
    split = dict(calibrated=10, dataset_hash=calib.dataset_hash, least_tokens=20)
    validation = validation_prompts(path, tokenizer, None, count=6, **split)
    assert len(validation) == 6 and not set(p.text for p in validation) & set(calib.texts)
    assert all(len(p.token_ids) == 20 for p in validation)
    assert len(validation_prompts(path, tokenizer, None, count=10_000, **split)) == calib.report.read - 10 - 1 - sum(
        len(tokenizer(t)["input_ids"]) < 20 for t in TEXTS if t
    )
    _jsonl(path, [{"text": t} for t in reversed(TEXTS)])  # the same name, other passages first
    assert validation_prompts(path, tokenizer, None, count=6, **split) == []


def test_every_pile_container_gives_the_same_prompts(tmp_path, tokenizer):
    import datasets
    import pandas as pd

    texts = [t for t in TEXTS if t]
    paths = [_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])]
    paths.append(tmp_path / "b.json")
    paths[-1].write_text(json.dumps([{"text": t} for t in texts]))
    paths.append(tmp_path / "c.parquet")
    pd.DataFrame({"text": texts, "n": range(len(texts))}).to_parquet(paths[-1])
    paths.append(tmp_path / "d.txt")
    paths[-1].write_text("\n".join(texts) + "\n")
    paths.append(tmp_path / "e")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(paths[-1]))
    hashes = {load_prompts(p, tokenizer, num_samples=8, least_tokens=12).dataset_hash for p in paths}
    assert len(hashes) == 1


@pytest.mark.parametrize("strings", ["default", "object"])
def test_mlcommons_pickle_of_this_pandas_loads_through_the_chat_template(tmp_path, tokenizer, strings):
    import pandas as pd

    frame = pd.DataFrame(
        {
            "system_prompt": ["Be brief.", "Be kind."],
            "question": ["What is memory?", "Why?"],
            "id": [1, 2],
            "score": [0.5, None],
        }
    )
    if strings == "object":
        frame = frame.astype(object)
    frame.to_pickle(tmp_path / "m.pkl")
    calib = load_prompts(tmp_path / "m.pkl", tokenizer)
    assert sorted(calib.texts) == sorted(
        [
            "<|begin|><|system|>Be brief.<|end|><|user|>What is memory?<|end|><|assistant|>",
            "<|begin|><|system|>Be kind.<|end|><|user|>Why?<|end|><|assistant|>",
        ]
    )
    for prompt in calib.prompts:  # the template carries BOS: the tokenizer must not add a second one
        assert prompt.token_ids == tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
        assert prompt.token_ids.count(tokenizer.bos_token_id) == 1


def test_without_a_chat_template_prompts_are_system_dot_question(tmp_path, plain_tokenizer):
    make_calib_set("mlcommons", tmp_path / "m.pkl", num_samples=6)
    import pandas as pd

    frame = pd.read_pickle(tmp_path / "m.pkl")
    calib = load_prompts(tmp_path / "m.pkl", plain_tokenizer)
    assert sorted(calib.texts) == sorted(f"{s}. {q}" for s, q in zip(frame["system_prompt"], frame["question"]))


def test_tc_messages_end_with_a_generation_prompt(tmp_path, tokenizer):
    make_calib_set("tc", tmp_path / "tc.jsonl", num_samples=7)
    calib = load_prompts(tmp_path / "tc.jsonl", tokenizer)
    assert calib.report.fmt == "tc" and calib.report.kept == 7
    assert all(t.startswith("<|begin|><|system|>") and t.endswith("<|assistant|>") for t in calib.texts)


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/ray-calib-pwned-by-pickle",))


def test_pickle_running_code_is_refused_naming_the_file(tmp_path, tokenizer):
    marker = Path("/tmp/ray-calib-pwned-by-pickle")
    marker.unlink(missing_ok=True)
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(DataError, match=r"evil\.pkl.*refusing to unpickle '(posix|os)\.system'"):
        load_prompts(bad, tokenizer)
    assert not marker.exists()


def test_pickle_of_something_else_or_non_plain_cells_is_refused(tmp_path, tokenizer):
    import pandas as pd

    (tmp_path / "d.pkl").write_bytes(pickle.dumps({"system_prompt": ["a"], "question": ["b"]}))
    with pytest.raises(DataError, match=r"d\.pkl: holds a dict, not a pandas DataFrame"):
        load_prompts(tmp_path / "d.pkl", tokenizer)
    pd.DataFrame({"system_prompt": ["a"], "question": [["a", "list"]]}).to_pickle(tmp_path / "l.pkl")
    with pytest.raises(DataError, match=r"l\.pkl: column 'question' row 0 holds a list"):
        load_prompts(tmp_path / "l.pkl", tokenizer)


def test_missing_fields_are_named_with_the_fields_found(tmp_path, tokenizer):
    import pandas as pd

    path = _jsonl(tmp_path / "p.jsonl", [{"content": "x", "id": 1}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: missing field 'text' \(fields found: content, id\)"):
        load_prompts(path, tokenizer)
    pd.DataFrame({"prompt": ["a"], "system_prompt": ["b"]}).to_pickle(tmp_path / "m.pkl")
    with pytest.raises(DataError, match=r"missing field 'question' \(fields found: prompt, system_prompt\)"):
        load_prompts(tmp_path / "m.pkl", tokenizer)
    bad_tc = _jsonl(tmp_path / "t.jsonl", [[{"role": "user", "text": "hi"}]])
    with pytest.raises(DataError, match=r"t\.jsonl:1: missing field 'content' \(fields found: role, text\)"):
        load_prompts(bad_tc, tokenizer, "tc")


def test_empty_result_names_the_filter_and_bad_requests_are_refused(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "p.jsonl", [{"text": "Short one."}, {"text": ""}])
    with pytest.raises(DataError, match=r"1 dropped \(shorter than 500 tokens\).*--least-tokens 500 filter"):
        load_prompts(path, tokenizer, least_tokens=500)
    with pytest.raises(DataError, match="unknown dataset format 'csv'"):
        load_prompts(path, tokenizer, "csv")
    with pytest.raises(DataError, match="applies to pile-style text only"):
        load_prompts(path, tokenizer, "tc", least_tokens=4)
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"cannot tell the dataset format from the suffix '\.csv'"):
        load_prompts(tmp_path / "x.csv", tokenizer)


def test_cli_reports_counts_and_turns_errors_into_one_line(tmp_path, tokenizer, capsys):
    from ray_calib.cli import main

    model = tmp_path / "model"
    tokenizer.save_pretrained(str(model))
    data = make_calib_set("pile", tmp_path / "p.jsonl", num_samples=20)
    result = CliRunner().invoke(cli, ["dataset-info", "-d", str(data), "-m", str(model), "-n", "4", "--show", "0"])
    assert result.exit_code == 0, result.output
    assert "20 read, 4 kept" in result.output and "dataset hash" in result.output
    with pytest.raises(SystemExit) as exit_info:
        main(["dataset-info", "-d", str(data), "-m", str(model), "-l", "100000"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "lower --least-tokens" in err


def test_missing_file_corrupt_parquet_and_bad_counts_are_one_line(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file or directory"):
        load_prompts(tmp_path / "missing.jsonl", tokenizer)
    (tmp_path / "bad.parquet").write_text("garbage")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        load_prompts(tmp_path / "bad.parquet", tokenizer)
    (tmp_path / "p.jsonl").write_text('{"text": "a b c"}\n')
    with pytest.raises(DataError, match="--least-tokens must be at least 1"):
        load_prompts(tmp_path / "p.jsonl", tokenizer, least_tokens=0)
