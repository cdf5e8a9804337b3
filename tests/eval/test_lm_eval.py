"""lm-evaluation-harness is optional: its absence is a one-line install hint, and when present it gets
the model moeforge loaded (see :mod:`tests.eval.fake_harness`). Tasks are checked before any model is
loaded, and may be task YAML files or directories, as ``lm_eval --tasks`` takes them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from transformers import PreTrainedModel

from moeforge.errors import MoeforgeError
from moeforge.eval.evaluate import evaluate
from moeforge.eval.lm_eval import INSTALL_HINT, prepare_tasks, run_lm_eval
from tests.eval.fake_harness import FakeHarness

# a harness task file as users write them: a function tag moeforge must not choke on
TASK_YAML = "task: {name}\ndataset_path: json\ndoc_to_text: !function utils.doc_to_text\noutput_type: multiple_choice\n"


def _task_file(directory: Path, file: str, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / file
    path.write_text(TASK_YAML.format(name=name))
    return path


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail even where it is installed
    with pytest.raises(MoeforgeError) as err:
        prepare_tasks(["hellaswag"])
    assert str(err.value) == INSTALL_HINT
    assert "pip install 'moeforge[eval]'" in INSTALL_HINT


def test_arguments_reach_the_harness(harness: FakeHarness, mixtral_dir: Path, tmp_path: Path) -> None:
    include = tmp_path / "tasks"
    _task_file(include / "nested", "extra.yaml", "extra_task")
    output = tmp_path / "out" / "lm_eval.json"
    tasks = prepare_tasks(["my_task", "extra_task"], include_path=include)
    scores = run_lm_eval(mixtral_dir, tasks, limit=5, batch_size=3, output=output)

    assert harness.calls["include_path"] == [str(include)]
    assert harness.calls["task_managers"] == 1  # built once, by prepare_tasks, and handed on
    hflm = harness.calls["hflm"]
    assert isinstance(hflm["pretrained"], PreTrainedModel) and hflm["pretrained"].config.model_type == "mixtral"
    assert hflm["tokenizer"] is not None and hflm["batch_size"] == 3
    evaluated = harness.calls["evaluate"]
    assert evaluated["tasks"] == ["my_task", "extra_task"] and evaluated["limit"] == 5
    assert evaluated["task_manager"] is tasks.manager
    assert scores["results"]["my_task"]["acc,none"] == pytest.approx(0.25)
    assert "samples" not in scores
    assert json.loads(output.read_text()) == scores


def test_unknown_task_is_named(harness: FakeHarness) -> None:
    with pytest.raises(MoeforgeError) as err:
        prepare_tasks(["hellaswag", "helaswag"])
    assert str(err.value) == (
        "lm-eval: unknown task(s) helaswag; list them with `lm-eval ls tasks`,"
        " give a task .yaml path, or add their YAML directory as the include path"
    )


def test_yaml_file_is_its_task_name_with_its_directory_included(harness: FakeHarness, tmp_path: Path) -> None:
    path = _task_file(tmp_path / "mine", "qa.yaml", "custom_qa")
    tasks = prepare_tasks([str(path), "hellaswag", str(path)])
    assert tasks.names == ["custom_qa", "hellaswag"]
    assert harness.calls["include_path"] == [str(tmp_path / "mine")]


def test_directory_is_every_task_it_defines(harness: FakeHarness, tmp_path: Path) -> None:
    directory = tmp_path / "suite"
    _task_file(directory, "b.yaml", "task_b")
    _task_file(directory, "a.yaml", "task_a")
    (directory / "group.yaml").write_text("group: my_suite\ntask: [task_a, task_b]\n")
    (directory / "_default_template_yaml").write_text("output_type: multiple_choice\n")  # no .yaml suffix: not a task
    (directory / "shared.yaml").write_text("dataset_path: json\n")  # no name: included by others, skipped
    _task_file(directory / "deeper", "c.yaml", "task_c")  # like lm_eval --tasks DIR: the top level only
    tasks = prepare_tasks([str(directory)], include_path=tmp_path / "suite" / "deeper")
    assert tasks.names == ["task_a", "task_b", "my_suite"]
    assert harness.calls["include_path"] == [str(directory / "deeper"), str(directory)]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: str(tmp / "nope.yaml"), "lm-eval task file {tmp}/nope.yaml does not exist"),
        (
            lambda tmp: str(_nameless(tmp / "anon.yaml")),
            "lm-eval task file {tmp}/anon.yaml defines no task name: give it a `task:` (or `group:`) key",
        ),
        (lambda tmp: str(tmp), "lm-eval task directory {tmp} has no .yaml file that defines a task or group"),
        (lambda tmp: str(_broken(tmp / "bad.yaml")), "lm-eval task file {tmp}/bad.yaml cannot be read: "),
    ],
)
def test_bad_task_paths_get_one_line(harness: FakeHarness, tmp_path: Path, make, message: str) -> None:
    with pytest.raises(MoeforgeError) as err:
        prepare_tasks([make(tmp_path)])
    assert str(err.value).startswith(message.format(tmp=tmp_path)) and "\n" not in str(err.value)
    assert "task_managers" not in harness.calls  # refused before the harness indexed anything


def _nameless(path: Path) -> Path:
    path.write_text("dataset_path: json\n")
    return path


def _broken(path: Path) -> Path:
    path.write_text("task: [unclosed\n")
    return path


def test_yaml_task_the_harness_did_not_index_names_its_file(harness: FakeHarness, tmp_path: Path, monkeypatch) -> None:
    path = _task_file(tmp_path, "qa.yaml", "custom_qa")
    monkeypatch.setattr("tests.eval.fake_harness.indexed_names", lambda _paths: [])  # as when the harness skips a bad YAML
    with pytest.raises(MoeforgeError, match=f"unknown task\\(s\\) custom_qa \\(from {path}\\);"):
        prepare_tasks([str(path)])


def test_evaluate_checks_tasks_before_loading_the_model(harness: FakeHarness, tmp_path: Path) -> None:
    # a model path that does not exist: had it been loaded first, the error would be about the model
    with pytest.raises(MoeforgeError, match="unknown task\\(s\\) helaswag;"):
        evaluate(tmp_path / "no-model", lm_eval_tasks=["helaswag"], output=tmp_path / "out")
    assert "hflm" not in harness.calls
    assert not (tmp_path / "out").exists()


def test_lm_eval_only_skips_the_perplexity_pass(
    harness: FakeHarness, mixtral_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_measure(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the perplexity pass ran")

    monkeypatch.setattr("moeforge.eval.evaluate._measure", no_measure)
    task = _task_file(tmp_path / "tasks", "qa.yaml", "custom_qa")
    out = tmp_path / "out"
    result = evaluate(mixtral_dir, lm_eval_tasks=[str(task)], output=out, perplexity=False)

    assert harness.calls["evaluate"]["tasks"] == ["custom_qa"]
    assert result.model is None and result.data is None and result.compare is None
    assert json.loads((out / "eval.json").read_text()) == result.report == {"model": str(mixtral_dir), "lm_eval": result.lm_eval}
    assert result.written == [out / "eval.json", out / "lm_eval.json"]
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "lm_eval.json"]  # no expert-load plot


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "perplexity=False leaves nothing to evaluate: name lm_eval_tasks, or keep the perplexity pass"),
        ({"lm_eval_tasks": ["my_task"], "text": ["a.txt"]}, "text needs the perplexity pass; drop it or leave perplexity=True"),
        ({"lm_eval_tasks": ["my_task"], "compare": "other"}, "compare needs the perplexity pass; drop it or leave perplexity=True"),
    ],
)
def test_lm_eval_only_refuses_what_it_would_ignore(harness: FakeHarness, tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(MoeforgeError) as err:
        evaluate(tmp_path / "no-model", output=tmp_path / "out", perplexity=False, **options)
    assert str(err.value) == message
