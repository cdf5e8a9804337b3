"""``moeforge eval`` through the real command-line entry point."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from moeforge.cli.main import main
from moeforge.eval.inputs import BUILTIN_DESCRIPTION
from moeforge.eval.lm_eval import INSTALL_HINT
from tests.eval.fake_harness import FakeHarness

TEXT = "Mixture-of-Experts models route each token to a few experts.\n" * 6
FAST = ["--max-length", "64", "--batch-size", "2"]


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "sample.txt"
    path.write_text(TEXT)
    return path


def test_eval_moe_writes_report_and_plot(mixtral_dir: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert main(["eval", str(mixtral_dir), "--text", str(text_file), "--output", str(out), *FAST]) == 0
    stdout = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    assert {"model", "data", "max_length", "nll", "perplexity", "tokens", "routing"} <= set(report)
    assert report["data"] == str(text_file) and report["tokens"] > 0
    assert len(report["routing"]["load"]) == 3
    assert (out / "expert_load.png").read_bytes().startswith(b"\x89PNG")
    assert f"perplexity {report['perplexity']:.4f}" in stdout
    assert "top load %" in stdout  # the routing table
    assert f"wrote {out / 'eval.json'}, {out / 'expert_load.png'}" in stdout


def test_builtin_sample_and_default_output_dir(pmoe_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(pmoe_dir), "--max-batches", "1", *FAST]) == 0
    assert f"evaluated on {BUILTIN_DESCRIPTION}" in capsys.readouterr().out
    report = json.loads((pmoe_dir / "eval" / "eval.json").read_text())
    assert [len(load) for load in report["routing"]["load"]] == [4, 8, 3]
    assert report["tokens"] == 2 * 63
    assert (pmoe_dir / "eval" / "expert_load.png").is_file()


def test_compare_prints_both_models(
    dense_dir: Path, mixtral_dir: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    args = ["eval", str(dense_dir), "--compare", str(mixtral_dir), "--text", str(text_file), "-o", str(out), *FAST]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    base, other = report["perplexity"], report["compare"]["perplexity"]
    assert f"{base:.4f}" in stdout and f"{other:.4f}" in stdout
    assert f"{other - base:+.4f}" in stdout
    assert "dense model: no routers" in stdout
    assert report["compare"]["tokens"] == report["tokens"]
    assert not (out / "expert_load.png").exists()  # the evaluated model is dense
    assert not (out / "expert_load_difference.png").exists()  # nothing to compare cell by cell


def test_compare_of_two_routed_models_draws_the_difference(mixtral_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = ["eval", str(mixtral_dir), "--compare", str(mixtral_dir), "--dtype", "bfloat16", "--text", str(text_file), "-o", str(out), *FAST]
    assert main(args) == 0
    assert (out / "expert_load_difference.png").read_bytes().startswith(b"\x89PNG")


def test_sft_data_file(dense_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(4)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "sft"
    assert main(["eval", str(dense_dir), "--data", str(data), "--stage", "sft", "-o", str(out), *FAST]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["data"] == f"{data} (sft)"
    assert 0 < report["tokens"] < 4 * 20  # the answers (and end-of-turn tokens) only


def test_csv_data_with_columns(dense_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "notes.csv"
    data.write_text('id,body\n1,"First note, with a comma."\n2,Second note.\n')
    out = tmp_path / "csv"
    assert main(["eval", str(dense_dir), "--data", str(data), "--columns", "text=body", "-o", str(out), *FAST]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["data"] == f"{data} (pt)"
    assert report["tokens"] == len("First note, with a comma.") + 1 + len("Second note.") - 1  # chars, EOS, minus the first


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--data", "{tmp}/nope.jsonl"], "nope.jsonl"),
        (["--text", "{tmp}/missing.txt"], "text file {tmp}/missing.txt does not exist"),
        (["--stage", "sft"], "--stage only applies to --data FILE"),
        (["--columns", "text=body"], "--columns only applies to --data FILE"),
        (["--limit", "5"], "--limit only applies to lm-eval; add --lm-eval TASKS"),
        (["--no-perplexity"], "--no-perplexity only applies to lm-eval; add --lm-eval TASKS"),
        (
            ["--no-perplexity", "--lm-eval", "my_task", "--text", "{tmp}/a.txt"],
            "--text needs the perplexity pass; drop it or --no-perplexity",
        ),
        (
            ["--no-perplexity", "--lm-eval", "my_task", "--compare", "other"],
            "--compare needs the perplexity pass; drop it or --no-perplexity",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(
    dense_dir: Path, tmp_path: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["eval", str(dense_dir), "-o", str(out), *(f.format(tmp=tmp_path) for f in flags)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeforge eval: error: ") and message.format(tmp=tmp_path) in err
    assert err.count("\n") == 1
    assert not out.exists()


def test_lm_eval_without_the_package_exits_2(
    mixtral_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    out = tmp_path / "none"
    assert main(["eval", str(mixtral_dir), "--lm-eval", "hellaswag", "-o", str(out)]) == 2
    assert capsys.readouterr().err == f"moeforge eval: error: {INSTALL_HINT}\n"
    assert not out.exists()  # refused before any evaluation


def test_lm_eval_results_join_the_report(
    harness: FakeHarness, mixtral_dir: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench"
    args = ["eval", str(mixtral_dir), "--text", str(text_file), "-o", str(out), "--lm-eval", "my_task", "--limit", "5", *FAST]
    assert main(args) == 0
    assert harness.calls["evaluate"]["tasks"] == ["my_task"] and harness.calls["evaluate"]["limit"] == 5
    report = json.loads((out / "eval.json").read_text())
    assert report["lm_eval"]["results"]["my_task"]["acc,none"] == pytest.approx(0.25)
    assert (out / "lm_eval.json").is_file()
    assert "my_task: acc,none 0.2500" in capsys.readouterr().out


def test_lm_eval_only_with_a_task_yaml(harness: FakeHarness, mixtral_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = tmp_path / "tasks" / "qa.yaml"
    task.parent.mkdir()
    task.write_text("task: custom_qa\ndataset_path: json\n")
    out = tmp_path / "bench"
    assert main(["eval", str(mixtral_dir), "-o", str(out), "--lm-eval", f"{task},hellaswag", "--no-perplexity"]) == 0
    assert harness.calls["evaluate"]["tasks"] == ["custom_qa", "hellaswag"]
    assert harness.calls["include_path"] == [str(task.parent)]
    report = json.loads((out / "eval.json").read_text())
    assert set(report) == {"model", "lm_eval"} and report["lm_eval"]["results"]["my_task"]["acc,none"] == pytest.approx(0.25)
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "lm_eval.json"]  # no perplexity, no expert-load plot
    assert capsys.readouterr().out == f"  my_task: acc,none 0.2500\nwrote {out / 'eval.json'}, {out / 'lm_eval.json'}\n"


def test_unknown_lm_eval_task_exits_2_before_loading(harness: FakeHarness, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "none"
    assert main(["eval", str(tmp_path / "no-model"), "--lm-eval", "helaswag", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeforge eval: error: lm-eval: unknown task(s) helaswag;") and err.count("\n") == 1
    assert "hflm" not in harness.calls and not out.exists()


PROBE = ["--probe", "kv", "--probe-pairs", "3", "--probe-samples", "2", "--max-batches", "1"]


def test_kv_probe_on_two_models(dense_dir: Path, mixtral_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "probe"
    assert main(["eval", str(dense_dir), "--compare", str(mixtral_dir), "-o", str(out), *PROBE, *FAST]) == 0
    stdout = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    assert "perplexity" in report and "perplexity" in report["compare"]  # probing keeps the perplexity run
    probes = report["probes"]
    assert list(probes) == [str(dense_dir), str(mixtral_dir)]
    for result in probes.values():
        assert result["probe"] == "kv" and result["slots"] == 3
        assert [p["position"] for p in result["positions"]] == [0, 1, 2]
        assert all(p["n"] == 2 and p["exact_match_ci"][0] <= p["exact_match"] for p in result["positions"])
    assert probes[str(dense_dir)]["positions"][0]["logprobs"] != probes[str(mixtral_dir)]["positions"][0]["logprobs"]
    assert (out / "position_curve.png").read_bytes().startswith(b"\x89PNG")
    table = stdout[stdout.index("kv retrieval: 3 pairs, seed 0; n = 2 per position") :]
    assert str(dense_dir) in table and str(mixtral_dir) in table and "gap (max-min)" in table
    assert f"{out / 'position_curve.png'}" in stdout.splitlines()[-1]


def test_mdqa_probe_with_chat_template(dense_dir: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs.jsonl"
    row = {"question": "Who?", "answer": "Ada", "gold": "Ada wrote it.", "distractors": ["Cats purr.", "Snow is cold."]}
    docs.write_text(json.dumps(row) + "\n")
    out = tmp_path / "mdqa"
    args = ["eval", str(dense_dir), "-o", str(out), "--probe", "mdqa", "--probe-docs", str(docs), "--chat-template"]
    assert main([*args, "--probe-positions", "0,2", "--max-batches", "1", *FAST]) == 0
    result = json.loads((out / "eval.json").read_text())["probes"][str(dense_dir)]
    assert result["spec"]["chat_template"] is True and result["slots"] == 3
    assert [p["position"] for p in result["positions"]] == [0, 2]
    assert (out / "position_curve.png").is_file()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--probe-docs", "{docs}"], "--probe-docs only applies to probes; add --probe kv or --probe mdqa"),
        (["--chat-template"], "--chat-template only applies to probes"),
        (["--probe", "kv", "--probe-docs", "{docs}"], "--probe-docs only applies to --probe mdqa"),
        (["--probe", "mdqa", "--probe-docs", "{docs}", "--probe-seed", "1"], "--probe-seed only applies to --probe kv"),
        (["--probe", "mdqa"], "--probe mdqa needs --probe-docs FILE"),
        (["--probe", "kv", "--probe-pairs", "1"], "--probe-pairs 1 must be at least 2"),
        (["--probe", "kv", "--probe-samples", "0"], "--probe-samples 0 must be at least 1"),
        (["--probe", "kv", "--probe-pairs", "4", "--probe-positions", "0,4"], "--probe-positions 4 is out of range"),
        (["--probe", "kv", "--probe-positions", "0,x"], "--probe-positions '0,x': give comma-separated integers"),
        (["--probe", "mdqa", "--probe-docs", "{docs}", "--probe-positions", "3"], "3 documents are numbered 0..2"),
        (["--probe", "mdqa", "--probe-docs", "{bad}"], "bad.jsonl:2: not valid JSON"),
        (["--probe", "mdqa", "--probe-docs", "{tmp}/nope.jsonl"], "nope.jsonl does not exist"),
    ],
)
def test_bad_probe_flags_exit_2_with_one_line(
    dense_dir: Path, tmp_path: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    row = {"question": "Who?", "answer": "Ada", "gold": "Ada wrote it.", "distractors": ["Cats purr.", "Snow."]}
    (tmp_path / "docs.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps(row) + "\n{oops\n")
    paths = {"docs": tmp_path / "docs.jsonl", "bad": tmp_path / "bad.jsonl", "tmp": tmp_path}
    out = tmp_path / "out"
    assert main(["eval", str(dense_dir), "-o", str(out), *(f.format(**paths) for f in flags)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeforge eval: error: ") and message in err
    assert err.count("\n") == 1
    assert not out.exists()  # refused before any model was loaded
