"""Position probes: prompt generation, teacher-forced scoring against hand computations and greedy
decoding, statistics, mdqa file validation and the plot, on tiny random models built in code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from moeforge.errors import MoeforgeError
from moeforge.eval.plots import plot_position_curve
from moeforge.eval.probes import (
    MDQA_INSTRUCTION,
    WORDS,
    KVProbe,
    MDQAProbe,
    PositionScore,
    ProbeItem,
    ProbePrompts,
    ProbeResult,
    ProbeValueError,
    bootstrap_ci,
    format_table,
    run_probe,
    spread_positions,
)
from tests.helpers import build_tiny_llama, make_tiny_tokenizer

DOCS = [
    {
        "question": "Who wrote Hamlet?",
        "answer": "Shakespeare",
        "gold": "Hamlet is a tragedy written by William Shakespeare.",
        "distractors": ["Paris is in France.", "Water boils at 100 degrees.", "The sky is blue."],
    },
    {
        "question": "What is the capital of Italy?",
        "answers": ["Rome", "Roma"],
        "documents": ["Cats purr.", "Rome is the capital of Italy.", "Snow is cold and white in winter.", "Ants."],
        "gold_index": 1,
    },
]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return build_tiny_llama()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tiny_tokenizer()


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in DOCS))
    return path


def _lines(item: ProbeItem) -> list[str]:
    """The key-value lines of a kv prompt (between the instruction and the question)."""
    return item.user.split("\n")[1:-1]


def test_kv_prompts_are_deterministic_per_seed() -> None:
    items = KVProbe(pairs=8, samples=4, seed=0).prompts().items
    assert items == KVProbe(pairs=8, samples=4, seed=0).prompts().items
    assert all(a.user != b.user for a, b in zip(items, KVProbe(pairs=8, samples=4, seed=1).prompts().items, strict=True))
    # sample i is the same prompt however many are drawn, so a longer run extends a shorter one
    assert KVProbe(pairs=8, samples=2, seed=0).prompts().items == items[: len(items) // 2]


def test_default_positions_spread_evenly_with_first_and_last() -> None:
    assert spread_positions(24) == (0, 6, 12, 18, 23)
    assert spread_positions(21) == (0, 5, 10, 15, 20)
    assert spread_positions(2) == (0, 1)
    prompts = KVProbe(samples=1).prompts()
    assert [item.position for item in prompts.items] == [0, 6, 12, 18, 23] and prompts.slots == 24


def test_kv_prompt_text_and_queried_pair_at_the_requested_index() -> None:
    for item in KVProbe(pairs=10, positions=(0, 3, 9), samples=3, seed=7).prompts().items:
        word = item.answer_prefix.removeprefix("Answer: The code for ").removesuffix(" is")
        lines = _lines(item)
        assert len(lines) == 10 and len({line.split()[3] for line in lines}) == 10  # distinct words
        assert lines[item.position] == f"The code for {word} is{item.target}"
        assert item.target[0] == " " and item.target[1:5].isdigit() and item.target[5:] == "."
        assert item.user.startswith("Remember the codes below.\nThe code for ")
        assert item.user.endswith(f"\nQuestion: What is the code for {word}?")
        assert item.prompt(make_tiny_tokenizer(), chat_template=False) == f"{item.user}\nAnswer: The code for {word} is"


def test_a_sample_shares_its_pairs_across_positions() -> None:
    items = KVProbe(pairs=6, positions=(0, 2, 5), samples=3).prompts().items
    for sample in range(3):
        group = [item for item in items if item.sample == sample]
        queried = [_lines(i)[i.position] for i in group]
        others = [[line for j, line in enumerate(_lines(i)) if j != i.position] for i in group]
        assert len(set(queried)) == 1 and all(o == others[0] for o in others)  # only the queried pair moved
        assert len({(i.answer_prefix, i.target) for i in group}) == 1


def test_chat_template_wraps_the_question_as_a_user_turn(tokenizer: PreTrainedTokenizerFast) -> None:
    item = KVProbe(pairs=3, samples=1).prompts().items[0]
    expected = tokenizer.apply_chat_template([{"role": "user", "content": item.user}], tokenize=False, add_generation_prompt=True)
    assert item.prompt(tokenizer, chat_template=True) == expected + item.answer_prefix
    plain = make_tiny_tokenizer()
    plain.chat_template = None
    with pytest.raises(MoeforgeError, match="no chat template"):
        item.prompt(plain, chat_template=True)


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (KVProbe(pairs=1), "pairs", "1 must be at least 2"),
        (KVProbe(pairs=len(WORDS) + 1), "pairs", "built-in words"),
        (KVProbe(samples=0), "samples", "0 must be at least 1"),
        (KVProbe(pairs=5, positions=(0, 5)), "positions", "5 is out of range: 5 pairs are numbered 0..4"),
        (KVProbe(positions=()), "positions", "is empty"),
    ],
)
def test_bad_kv_settings_name_the_field(spec: KVProbe, field: str, message: str) -> None:
    with pytest.raises(ProbeValueError, match=message) as caught:
        spec.prompts()
    assert caught.value.field == field and str(caught.value).startswith(f"{field} ")


def test_mdqa_moves_the_gold_document_and_accepts_both_layouts(docs: Path) -> None:
    prompts = MDQAProbe(docs, positions=(0, 2, 3)).prompts()
    assert prompts.slots == 4 and "2 of 2 rows, 4 documents" in prompts.description
    for item in prompts.items:
        row = DOCS[item.sample]
        gold = row.get("gold") or row["documents"][row["gold_index"]]
        assert f"Document [{item.position + 1}] {gold}\n" in item.user + "\n"
        assert item.user.startswith(f"{MDQA_INSTRUCTION}\n\nDocument [1] ")
        assert item.user.endswith(f"\n\nQuestion: {row['question']}") and item.answer_prefix == "Answer:"
    assert [i.target for i in prompts.items] == [" Shakespeare"] * 3 + [" Rome"] * 3
    distractors = ["Cats purr.", "Snow is cold and white in winter.", "Ants."]
    assert "\n".join(f"Document [{i}] {d}" for i, d in enumerate(distractors, 1)) in prompts.items[5].user  # at the end
    assert MDQAProbe(docs, samples=1).prompts().items == [i for i in MDQAProbe(docs).prompts().items if i.sample == 0]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["{not json"], ":1: not valid JSON"),
        ([json.dumps(DOCS[0]), "", "[1, 2]"], ":3: expected a JSON object"),
        ([json.dumps({**DOCS[0], "question": ""})], ':1: "question" must be a non-empty string'),
        ([json.dumps({**DOCS[1], "answers": []})], ':1: needs "answer" (a string) or "answers"'),
        ([json.dumps({**DOCS[1], "gold_index": 4})], ':1: "gold_index" 4 is out of range for 4 documents'),
        ([json.dumps({k: v for k, v in DOCS[0].items() if k != "distractors"})], ':1: "gold" must be a string'),
        ([json.dumps(DOCS[0]), json.dumps({**DOCS[1], "documents": ["a", "b"]})], ":2: 2 documents, but line 1 has 4"),
        ([""], "holds no rows"),
    ],
)
def test_malformed_mdqa_rows_name_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MoeforgeError, match="^" + str(path).replace(".", r"\.")) as caught:
        MDQAProbe(path).prompts()
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_missing_mdqa_file(tmp_path: Path) -> None:
    with pytest.raises(MoeforgeError, match=r"nope\.jsonl does not exist"):
        MDQAProbe(tmp_path / "nope.jsonl").prompts()


def test_answer_logprob_matches_a_manual_forward(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    spec = KVProbe(pairs=4, positions=(2,), samples=1, seed=3)
    item = spec.prompts().items[0]
    result = run_probe(model, tokenizer, spec)
    prompt_ids = tokenizer(item.prompt(tokenizer, False))["input_ids"]
    ids = tokenizer(item.prompt(tokenizer, False) + item.target)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids and tokenizer.decode(ids[len(prompt_ids) :]) == item.target
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = sum(logprobs[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids)))
    (score,) = result.positions
    assert score.n == 1 and score.logprob == pytest.approx(expected, abs=1e-4)


def test_padding_does_not_change_per_prompt_scores(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, docs: Path) -> None:
    spec = MDQAProbe(docs)  # rows and answers of different lengths: batches are padded
    alone = run_probe(model, tokenizer, spec, batch_size=1)
    batched = run_probe(model, tokenizer, spec, batch_size=5)
    assert alone.prompt_tokens[0] < alone.prompt_tokens[1]
    for a, b in zip(alone.positions, batched.positions, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4) and a.exact == b.exact


class _WithoutLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward takes no ``logits_to_keep`` (older or remote-code models)."""

    def __init__(self, inner: LlamaForCausalLM) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool) -> object:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_models_without_logits_to_keep_score_the_same(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    spec = KVProbe(pairs=3, samples=2)
    kept = run_probe(model, tokenizer, spec, batch_size=3)
    full = run_probe(_WithoutLogitsToKeep(model), tokenizer, spec, batch_size=3)
    for a, b in zip(kept.positions, full.positions, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5) and a.exact == b.exact


@dataclass(frozen=True)
class _FixedProbe:
    """Given prompts and targets, scored like a real spec (run_probe only needs these members)."""

    items: tuple[ProbeItem, ...]
    chat_template: bool = False

    def prompts(self) -> ProbePrompts:
        return ProbePrompts(list(self.items), 1, "fixed")


def test_exact_match_agrees_with_greedy_generate(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    item = KVProbe(pairs=3, samples=1).prompts().items[0]
    prompt = item.prompt(tokenizer, False)
    prompt_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        generated = model.generate(prompt_ids, max_new_tokens=4, do_sample=False, pad_token_id=3)[0, prompt_ids.shape[1] :]
    assert all(int(t) > 3 for t in generated)  # no special tokens, so the decoded text tokenizes back
    greedy = tokenizer.decode(generated)
    wrong = greedy[:-1] + ("a" if greedy[-1] != "a" else "b")
    probe = _FixedProbe(tuple(ProbeItem(0, 0, item.user, item.answer_prefix, t) for t in (greedy, wrong, item.target)))
    (score,) = run_probe(model, tokenizer, probe, batch_size=2).positions
    target_ids = tokenizer(item.target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        target_greedy = model.generate(prompt_ids, max_new_tokens=len(target_ids), do_sample=False, pad_token_id=3)
    assert score.exact == (True, False, target_greedy[0, prompt_ids.shape[1] :].tolist() == target_ids)
    assert score.logprobs[0] > score.logprobs[1]  # the greedy continuation is the likelier one


def test_bootstrap_ci_is_deterministic_and_contains_the_mean() -> None:
    values = torch.Generator().manual_seed(0)
    data = torch.randn(50, generator=values).tolist()
    low, high = bootstrap_ci(data)
    assert bootstrap_ci(data) == (low, high)
    assert low < sum(data) / len(data) < high
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)
    wide = bootstrap_ci(data[:10])
    assert wide[1] - wide[0] > high - low  # fewer prompts, wider interval


def _result(logprobs: dict[int, list[float]], exact: dict[int, list[bool]]) -> ProbeResult:
    positions = tuple(PositionScore.from_scores(p, logprobs[p], exact[p]) for p in sorted(logprobs))
    return ProbeResult(KVProbe(pairs=10), "kv retrieval: 10 pairs, seed 0", 10, (100, 120), positions)


def test_gaps_table_and_report() -> None:
    base = _result({0: [-1.0, -2.0], 5: [-4.0, -6.0], 9: [-2.0, -2.0]}, {0: [True, True], 5: [False, True], 9: [True, False]})
    moice = _result({0: [-1.0, -1.0], 5: [-1.5, -1.5], 9: [-1.0, -1.0]}, {0: [True, True], 5: [True, True], 9: [True, True]})
    assert base.logprob_gap == pytest.approx(3.5) and base.exact_match_gap == pytest.approx(0.5)
    assert moice.logprob_gap == pytest.approx(0.5) and moice.exact_match_gap == 0.0
    table = format_table({"base": base, "moice": moice})
    lines = table.splitlines()
    assert lines[0].startswith("kv retrieval: 10 pairs, seed 0; n = 2 per position; rows: position of the queried pair (0..9)")
    assert lines[1].split() == ["base", "moice"]
    assert [line.split()[0] for line in lines[3:6]] == ["0", "5", "9"]
    assert lines[4].split()[1:4] == ["0.50", "[0.00,", "1.00]"] and "-5.00" in lines[4]
    assert lines[-1].split() == ["gap", "(max-min)", "0.50", "3.50", "0.00", "0.50"]
    report = json.loads(json.dumps(base.to_dict()))
    assert report["probe"] == "kv" and report["spec"]["pairs"] == 10 and report["logprob_gap"] == 3.5
    assert report["positions"][1] == {
        "position": 5,
        "n": 2,
        "exact_match": 0.5,
        "exact_match_ci": [0.0, 1.0],
        "logprob": -5.0,
        "logprob_ci": list(base.positions[1].logprob_ci),
        "logprobs": [-4.0, -6.0],
        "exact": [False, True],
    }


def test_position_curve_png(tmp_path: Path) -> None:
    base = _result({0: [-1.0, -2.0], 9: [-2.0, -3.0]}, {0: [True, False], 9: [False, False]})
    moice = _result({0: [-1.0, -1.5], 9: [-1.2, -1.0]}, {0: [True, True], 9: [True, False]})
    path = tmp_path / "plots" / "position_curve.png"
    assert plot_position_curve({"base": base, "moice": moice}, path, title="base vs moice") == path
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and len(path.read_bytes()) > 5_000
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # written atomically
