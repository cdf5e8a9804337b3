"""The bad-input table: every subcommand, fed what users really mistype, answers with one line and exit 2, before
the long work, without a traceback, and leaves nothing behind at its output.

Each row: the command line (``{tiny}`` is a saved tiny Llama, ``{tmp}`` the test's directory, ``{out}`` the
output that must not appear), files to write first, and a phrase the error must contain.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from moeforge.cli.main import main
from tests.helpers import save_tiny_llama

CONVERT = "source: {tiny}\noutput: {out}\nmoe: {num_experts: 4, top_k: 2}\n"
TRAIN = "stage: pt\nmodel: {tiny}\noutput: {out}\ndata: {builtin: pt-demo, max_rows: 8, max_length: 16}\ntraining: {max_steps: 1}\n"


def _convert(extra: str = "", **replace: str) -> str:
    text = CONVERT
    for key, value in replace.items():
        text = text.replace(key, value)
    return text + extra


def _train(extra: str = "", **replace: str) -> str:
    text = TRAIN
    for key, value in replace.items():
        text = text.replace(key, value)
    return text + extra


# (id, argv, {file: content}, phrase)
CASES: list[tuple[str, str, dict[str, str | bytes], str]] = [
    # convert recipes
    ("recipe-missing", "convert {tmp}/none.yaml", {}, "does not exist"),
    ("recipe-not-yaml", "convert {tmp}/r.yaml", {"r.yaml": "source: [unclosed\n"}, "not valid YAML"),
    ("recipe-a-list", "convert {tmp}/r.yaml", {"r.yaml": "- source\n"}, "top level must be a mapping"),
    ("recipe-not-utf8", "convert {tmp}/r.yaml", {"r.yaml": b"source: caf\xe9\n"}, "not UTF-8"),
    ("recipe-unknown-key", "convert {tmp}/r.yaml", {"r.yaml": _convert("exprt: mixtral\n")}, "did you mean export"),
    ("recipe-key-elsewhere", "convert {tmp}/r.yaml", {"r.yaml": _convert("top_k: 2\n")}, "moe.top_k"),
    ("recipe-nested-typo", "convert {tmp}/r.yaml", {"r.yaml": _convert(**{"num_experts": "num_expert"})}, "moe.num_expert"),
    ("top-k-zero", "convert {tmp}/r.yaml", {"r.yaml": _convert(**{"top_k: 2": "top_k: 0"})}, "moe.top_k"),
    ("top-k-above-experts", "convert {tmp}/r.yaml", {"r.yaml": _convert(**{"top_k: 2": "top_k: 9"})}, "larger than num_experts"),
    ("no-experts", "convert {tmp}/r.yaml", {"r.yaml": _convert(**{"num_experts: 4": "num_experts: 0"})}, "moe.num_experts"),
    ("seed-huge", "convert {tmp}/r.yaml", {"r.yaml": _convert("seed: 99999999999999999999\n")}, "seed"),
    ("dtype-unknown", "convert {tmp}/r.yaml", {"r.yaml": _convert("dtype: fp8\n")}, "dtype"),
    ("export-unknown", "convert {tmp}/r.yaml", {"r.yaml": _convert("export: deepseek\n")}, "export"),
    ("shard-size", "convert {tmp}/r.yaml", {"r.yaml": _convert("max_shard_size: lots\n")}, "max_shard_size"),
    ("calibration-file", "convert {tmp}/r.yaml", {"r.yaml": _convert("calibration: {file: {tmp}/none.txt}\n")}, "calibration.file"),
    ("layers-beyond", "convert {tmp}/r.yaml", {"r.yaml": _convert(**{"top_k: 2}": "top_k: 2, placement: {layers: [0, 9]}}"})}, "9"),
    ("gate-unknown", "convert {tmp}/r.yaml", {"r.yaml": _convert(**{"top_k: 2}": "top_k: 2, routing: {gate_type: tree}}"})}, "gate_type"),
    (
        "export-cannot-hold",
        "convert {tmp}/r.yaml",
        {"r.yaml": _convert("export: mixtral\n", **{"top_k: 2}": "top_k: 2, routing: {gate_type: mlp}}"})},
        "mixtral",
    ),
    (
        "shared-too-many",
        "convert --source {tiny} --output {out} --num-experts 4 --top-k 1 --shared-experts 200",
        {},
        "moe.shared.num_experts",
    ),
    ("flags-without-source", "convert --output {out} --num-experts 4 --top-k 1", {}, "source"),
    # sources
    ("source-missing", "convert --source {tmp}/nothing --output {out} --num-experts 2 --top-k 1", {}, "does not exist"),
    ("source-no-config", "convert --source {tmp}/empty --output {out} --num-experts 2 --top-k 1", {"empty/x.txt": "x"}, "config.json"),
    (
        "source-config-not-json",
        "convert --source {tmp}/m --output {out} --num-experts 2 --top-k 1",
        {"m/config.json": "{oops"},
        "not readable JSON",
    ),
    (
        "source-unsupported",
        "convert --source {tmp}/m --output {out} --num-experts 2 --top-k 1",
        {"m/config.json": '{"model_type": "bert"}'},
        "not supported",
    ),
    ("source-truncated-weights", "convert --source {broken} --output {out} --num-experts 2 --top-k 1", {}, "model.safetensors"),
    ("source-gguf-missing", "convert --source {tmp}/model.gguf --output {out} --num-experts 2 --top-k 1", {}, "does not exist"),
    # outputs
    ("output-exists", "convert --source {tiny} --output {tmp}/taken --num-experts 2 --top-k 1", {"taken/x": "x"}, "already exists"),
    ("output-is-a-file", "convert --source {tiny} --output {tmp}/file --num-experts 2 --top-k 1", {"file": "x"}, "not a directory"),
    ("output-under-a-file", "convert --source {tiny} --output {tmp}/file/out --num-experts 2 --top-k 1", {"file": "x"}, "which is a file"),
    # train recipes
    ("train-no-stage", "train {tmp}/t.yaml", {"t.yaml": _train(**{"stage: pt\n": ""})}, "stage"),
    ("train-bad-stage", "train {tmp}/t.yaml", {"t.yaml": _train(**{"stage: pt": "stage: rlhf"})}, "stage"),
    ("train-model-missing", "train {tmp}/t.yaml", {"t.yaml": _train(**{"{tiny}": "{tmp}/nothing"})}, "does not exist"),
    ("train-model-is-train-recipe", "train {tmp}/t.yaml", {"t.yaml": _train(**{"{tiny}": "{tmp}/t.yaml"})}, "is a training recipe"),
    (
        "train-data-missing",
        "train {tmp}/t.yaml",
        {"t.yaml": _train(**{"{builtin: pt-demo, max_rows: 8, max_length: 16}": "{train: {tmp}/none.jsonl}"})},
        "none.jsonl",
    ),
    ("train-data-bad-key", "train {tmp}/t.yaml", {"t.yaml": _train(**{"max_rows: 8": "max_row: 8"})}, "data.max_row"),
    ("train-eval-ratio", "train {tmp}/t.yaml", {"t.yaml": _train(**{"max_rows: 8": "eval_ratio: 1.5"})}, "eval_ratio"),
    ("train-freeze-unknown", "train {tmp}/t.yaml", {"t.yaml": _train("freeze: [gates]\n")}, "freeze"),
    ("train-freeze-layers", "train {tmp}/t.yaml", {"t.yaml": _train('freeze_layers: "0-40"\n')}, "freeze_layers"),
    ("train-preset", "train {tmp}/t.yaml", {"t.yaml": _train("preset: routers\n")}, "preset"),
    ("train-lr", "train {tmp}/t.yaml", {"t.yaml": _train(**{"max_steps: 1": "max_steps: 1, learning_rate: -1"})}, "learning_rate"),
    ("train-optim", "train {tmp}/t.yaml", {"t.yaml": _train(**{"max_steps: 1": "max_steps: 1, optim: lion"})}, "optim"),
    (
        "train-optim-8bit-cpu",
        "train {tmp}/t.yaml",
        {"t.yaml": _train(**{"max_steps: 1": "max_steps: 1, optim: adamw_8bit"})},
        "training.optim",
    ),
    ("train-adapter-method", "train {tmp}/t.yaml", {"t.yaml": _train("adapter: {method: ia3}\n")}, "adapter.method"),
    ("train-moice-base", "train {tmp}/t.yaml", {"t.yaml": _train("moice: {base_set: [5.0, 10.0]}\n")}, "base_set"),
    ("train-deepspeed-config-missing", "train {tmp}/t.yaml", {"t.yaml": _train("deepspeed: {tmp}/ds.json\n")}, "deepspeed"),
    (
        "train-deepspeed-config-not-json",
        "train {tmp}/t.yaml",
        {"t.yaml": _train("deepspeed: {tmp}/ds.json\n"), "ds.json": "stage: 3\n"},
        "is not JSON",
    ),
    (
        "train-deepspeed-zero3-no-gather",
        "train {tmp}/t.yaml",
        {"t.yaml": _train("deepspeed: {tmp}/ds.json\n"), "ds.json": '{"zero_optimization": {"stage": 3}}'},
        "stage3_gather_16bit_weights_on_model_save",
    ),
    ("train-output-holds-a-run", "train {tmp}/t.yaml", {"t.yaml": _train(**{"{out}": "{tmp}/run"}), "run/x": "x"}, "already holds a run"),
    # data
    ("data-check-missing", "data check {tmp}/none.jsonl", {}, "none.jsonl"),
    ("data-check-bad-json", "data check {tmp}/d.jsonl", {"d.jsonl": '{"text": "a"}\n{oops\n'}, "d.jsonl:2"),
    ("data-check-no-text", "data check {tmp}/d.jsonl", {"d.jsonl": '{"body": "a"}\n'}, "d.jsonl"),
    (
        "data-convert-same-output",
        "data convert {tmp}/d.jsonl {tmp}/d.jsonl --eval-ratio 0.5 --eval-output {tmp}/d.jsonl",
        {"d.jsonl": '{"text": "a"}\n'},
        "eval output must differ",
    ),
    (
        "data-convert-ratio",
        "data convert {tmp}/d.jsonl {out}.jsonl --eval-ratio 1.5 --eval-output {tmp}/e.jsonl",
        {"d.jsonl": '{"text": "a"}\n'},
        "eval",
    ),
    # eval
    ("eval-model-missing", "eval {tmp}/nothing -o {out}", {}, "does not exist"),
    ("eval-text-missing", "eval {tiny} --text {tmp}/none.txt -o {out}", {}, "none.txt"),
    ("eval-stage-without-data", "eval {tiny} --stage sft -o {out}", {}, "--stage only applies to --data"),
    ("eval-limit-without-lm-eval", "eval {tiny} --limit 5 -o {out}", {}, "--limit only applies to lm-eval"),
    ("eval-mdqa-without-docs", "eval {tiny} --probe mdqa -o {out}", {}, "--probe-docs"),
    ("eval-compare-missing", "eval {tiny} --compare {tmp}/nothing -o {out}", {}, "nothing"),
    ("eval-output-under-a-file", "eval {tiny} -o {tmp}/file/eval", {"file": "x"}, "which is a file"),
    ("eval-data-missing", "eval {tiny} --data {tmp}/none.jsonl -o {out}", {}, "none.jsonl"),
    # chat, inspect, merge, plan, import-config
    ("chat-model-missing", "chat {tmp}/nothing --prompt hi", {}, "does not exist"),
    ("chat-adapter-missing", "chat {tiny} --adapter {tmp}/nothing --prompt hi", {}, "nothing"),
    ("inspect-missing", "inspect {tmp}/nothing", {}, "does not exist"),
    ("inspect-no-config", "inspect {tmp}/empty", {"empty/x.txt": "x"}, "config.json"),
    ("merge-plain-model", "merge {tiny} -o {out}", {}, "adapter"),
    ("merge-missing", "merge {tmp}/nothing -o {out}", {}, "nothing"),
    ("plan-missing", "plan {tmp}/nothing", {}, "nothing"),
    ("plan-gpu-memory", "plan {tiny} --gpu-memory lots", {}, "lots"),
    ("plan-bad-recipe", "plan {tmp}/r.yaml", {"r.yaml": _convert(**{"top_k: 2": "top_k: 0"})}, "moe.top_k"),
    ("import-config-unknown", "import-config {tmp}/c.json", {"c.json": '{"hello": 1}'}, "c.json"),
    ("import-config-missing", "import-config {tmp}/none.json", {}, "none.json"),
    (
        "import-config-output-exists",
        "import-config {tmp}/c.json -o {tmp}/file/r.yaml",
        {"c.json": '{"num_experts": 8, "expert_top_k": 2}', "file": "x"},
        "file",
    ),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def broken(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its weight file cut in half (a broken download)."""
    import shutil

    target = tmp_path_factory.mktemp("broken") / "tiny"
    shutil.copytree(tiny, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return target


@pytest.mark.parametrize(("argv", "files", "phrase"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input(
    argv: str, files: dict[str, str | bytes], phrase: str, tiny: Path, broken: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    names = {"tiny": tiny, "broken": broken, "tmp": tmp_path, "out": out}

    def fill(text: str) -> str:
        for name, path in names.items():
            text = text.replace("{" + name + "}", str(path))
        return text

    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(fill(content))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    command = argv.split()[0]
    assert main([fill(part) for part in argv.split()]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"moeforge {command}"), err  # "moeforge CMD: error: ..." (data check: its finding)
    assert phrase in last, last
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written, nothing partial


def test_the_table_is_about_eighty_cases() -> None:
    commands = {argv.split()[0] for _, argv, _, _ in CASES}
    assert len(CASES) >= 70 and commands >= {"convert", "train", "data", "eval", "chat", "inspect", "merge", "plan", "import-config"}


def test_a_conversion_killed_with_sigkill_leaves_nothing_the_next_run_keeps(tiny: Path, tmp_path: Path) -> None:
    """kill -9 cannot be cleaned up after: its staging directory stays until the next run of the same output."""
    out = tmp_path / "moe"
    code = (
        "import os, sys, time\n"
        "import moeforge.io.publish as publish\n"
        "real = publish.staged_directory.__wrapped__\n"
        "def slow(*a, **k):\n"
        "    gen = real(*a, **k)\n"
        "    tmp = next(gen)\n"
        "    (tmp / 'half-written').write_text('x')\n"
        "    print(tmp, flush=True)\n"
        "    time.sleep(60)\n"
        "    yield tmp\n"
        "publish.staged_directory = publish.contextmanager(slow)\n"
        "import moeforge.conversion.pipeline as pipeline\n"
        "pipeline.staged_directory = publish.staged_directory\n"
        "from moeforge.cli.main import main\n"
        f"main(['convert', '--source', {str(tiny)!r}, '--output', {str(out)!r}, '--num-experts', '2', '--top-k', '1'])\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    staging = Path(process.stdout.readline().strip())
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert staging.is_dir() and not out.exists()  # what kill -9 leaves
    assert main(["convert", "--source", str(tiny), "--output", str(out), "--num-experts", "2", "--top-k", "1"]) == 0
    assert not staging.exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]
