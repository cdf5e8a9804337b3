"""Long-context position probes: how well a causal LM finds one fact as it moves through the prompt.

"Lost in the middle" (Liu et al., 2023) is the drop in accuracy when the needed fact sits in the middle
of a long context rather than at its start or end; MoICE (arXiv 2406.19598) is meant to flatten that
curve. These probes measure it for any HF causal LM and tokenizer, so a base model and its MoICE
version can be compared on the same prompts:

- :class:`KVProbe`: generated key-value retrieval ("The code for <word> is <4 digits>." lines, then a
  question about one of them). Prompts come from a seed, so a new seed gives held-out prompts, and
  sample ``i`` holds the same pairs at every position: only the queried pair moves, so positions are
  compared on matched prompts.
- :class:`MDQAProbe`: multi-document QA over the user's JSONL rows; the gold document moves among the
  distractors, the distractors keep their order.

Every prompt is scored teacher-forced in one forward pass: the answer's log-probability (the sum over
its tokens) and exact match (greedy decoding would produce exactly the answer tokens: the argmax at
every answer position is the answer token). Teacher forcing is what makes the two agree with a greedy
``generate`` while costing one batched forward per prompt instead of one per generated token.
Per position, means come with percentile-bootstrap 95% confidence intervals over prompts.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeGuard, get_args

import numpy as np

from moeforge.errors import MoeforgeError

if TYPE_CHECKING:  # torch and transformers are imported where a probe runs: the CLI's parser reads the kinds
    from transformers import PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

DEFAULT_POSITIONS = 5
BOOTSTRAP_RESAMPLES = 1000
CI_LEVEL = 0.95

# common English nouns: short, unambiguous keys; every word is distinct, so a question has one answer
WORDS = (  # noqa: SIM905 (a word list reads better as text)
    "acorn anchor apple arrow badge bamboo banana basket beach bell blanket boat bottle bread bridge brush "
    "bucket butter button cabin cable camera candle canoe carpet castle chair cheese cherry chimney circle "
    "clock cloud coat coffee coin comet compass copper cotton crown cup curtain desert diamond dolphin door "
    "dragon drum eagle engine feather fence finger flag flower forest fountain garden garlic glove guitar "
    "hammer harbor harvest helmet honey horse island jacket jungle kettle kitchen ladder lamp lantern lemon "
    "letter lion magnet mango map marble meadow mirror monkey mountain needle ocean onion orange orchard owl "
    "paint palace paper parrot pebble pencil pepper piano pillow planet pocket potato puzzle quilt rabbit "
    "radio ribbon river rocket saddle salmon sandal saucer school scissors shadow shell shovel silver spider "
    "spoon square stamp station stone street sugar summer table teapot thimble tiger timber tomato tower "
    "train tunnel turtle umbrella valley violin wagon wallet walnut willow window winter wolf yacht zebra"
).split()

MDQA_INSTRUCTION = "Write a high-quality answer for the given question using only the provided search results."


class ProbeValueError(MoeforgeError):
    """A probe setting out of range. ``field`` names the setting, so the CLI can name its own flag."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field} {detail}")
        self.field = field
        self.detail = detail


@dataclass(frozen=True)
class ProbeItem:
    """One prompt: the user text (context and question), the start of the answer, and the target the
    model should continue with. ``sample`` and ``position`` pair it with its twins at other positions."""

    sample: int
    position: int
    user: str
    answer_prefix: str
    target: str

    def prompt(self, tokenizer: PreTrainedTokenizerBase, chat_template: bool) -> str:
        """Plain: the user text and the answer start on the next line. With the chat template the user
        text is a user turn and the assistant turn opens with the same answer start, so both formats
        score the same target continuation."""
        if not chat_template:
            return f"{self.user}\n{self.answer_prefix}"
        if not getattr(tokenizer, "chat_template", None):
            raise MoeforgeError("the tokenizer has no chat template; score the plain prompt (chat_template off)")
        from moeforge.eval.token_stream import chat_text

        turn = [{"role": "user", "content": self.user}]
        return chat_text(tokenizer, turn, add_generation_prompt=True) + self.answer_prefix


@dataclass(frozen=True)
class ProbePrompts:
    """A spec's prompts, sample-major (sample 0 at each position, then sample 1, ...); ``slots``: how
    many places the fact can take (pairs, or documents); ``description``: one line for tables and plots."""

    items: list[ProbeItem]
    slots: int
    description: str


def spread_positions(slots: int, count: int = DEFAULT_POSITIONS) -> tuple[int, ...]:
    """``count`` positions evenly spread over ``0..slots-1``, first and last included (24 -> 0,6,12,18,23)."""
    if slots == 1 or count == 1:
        return (0,)
    return tuple(sorted({math.ceil(i * (slots - 1) / (count - 1)) for i in range(count)}))


def _resolve_positions(positions: Sequence[int] | None, slots: int, unit: str) -> tuple[int, ...]:
    if positions is None:
        return spread_positions(slots)
    if not positions:
        raise ProbeValueError("positions", "is empty; give at least one position")
    for position in positions:
        if not 0 <= position < slots:
            raise ProbeValueError("positions", f"{position} is out of range: {slots} {unit}s are numbered 0..{slots - 1}")
    return tuple(sorted(set(positions)))


def _check_samples(samples: int) -> None:
    if samples < 1:
        raise ProbeValueError("samples", f"{samples} must be at least 1")


@dataclass(frozen=True)
class KVProbe:
    """Key-value retrieval over ``pairs`` generated lines; ``samples`` prompts per position (``positions``
    default: 5 evenly spread over ``0..pairs-1``). Sample ``i`` of seed ``s`` is the same prompt whatever
    ``samples`` is, so a larger run extends a smaller one."""

    pairs: int = 24
    positions: tuple[int, ...] | None = None
    samples: int = 50
    seed: int = 0
    chat_template: bool = False

    kind: ClassVar[str] = "kv"
    position_of: ClassVar[str] = "queried pair"

    def prompts(self) -> ProbePrompts:
        if self.pairs < 2:
            raise ProbeValueError("pairs", f"{self.pairs} must be at least 2 (the queried pair and a distractor)")
        if self.pairs > len(WORDS):
            raise ProbeValueError("pairs", f"{self.pairs} exceeds the {len(WORDS)} built-in words")
        _check_samples(self.samples)
        positions = _resolve_positions(self.positions, self.pairs, "pair")
        items = []
        for sample in range(self.samples):
            rng = np.random.default_rng([self.seed, sample])  # independent of how many samples are drawn
            words = [str(w) for w in rng.choice(WORDS, size=self.pairs, replace=False)]
            codes = [str(c) for c in rng.integers(1000, 10000, size=self.pairs)]
            lines = [f"The code for {w} is {c}." for w, c in zip(words, codes, strict=True)]
            queried = int(rng.integers(self.pairs))
            others = lines[:queried] + lines[queried + 1 :]
            word = words[queried]
            for position in positions:
                context = [*others[:position], lines[queried], *others[position:]]
                user = "Remember the codes below.\n" + "\n".join(context) + f"\nQuestion: What is the code for {word}?"
                items.append(ProbeItem(sample, position, user, f"Answer: The code for {word} is", f" {codes[queried]}."))
        return ProbePrompts(items, self.pairs, f"kv retrieval: {self.pairs} pairs, seed {self.seed}")


@dataclass(frozen=True)
class _MDQARow:
    question: str
    answer: str
    gold: str
    distractors: list[str]


class _BadRow(Exception):
    """What is wrong with one JSONL row; :func:`_read_mdqa` adds the file and line."""


def _str_list(value: Any) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _parse_mdqa_row(row: Any) -> _MDQARow:
    """One JSONL row, in either layout."""
    if not isinstance(row, dict):
        raise _BadRow("expected a JSON object")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise _BadRow('"question" must be a non-empty string')
    if "answer" in row:
        answer = row["answer"]
    elif _str_list(row.get("answers")) and row["answers"]:
        answer = row["answers"][0]
    else:
        raise _BadRow('needs "answer" (a string) or "answers" (a non-empty list of strings)')
    if not isinstance(answer, str) or not answer.strip():
        raise _BadRow("the answer must be a non-empty string")
    if "gold" in row:
        if not isinstance(row["gold"], str) or not _str_list(row.get("distractors")):
            raise _BadRow('"gold" must be a string and "distractors" a list of strings')
        return _MDQARow(question, answer.strip(), row["gold"], row["distractors"])
    documents, gold_index = row.get("documents"), row.get("gold_index")
    if not _str_list(documents) or not isinstance(gold_index, int) or isinstance(gold_index, bool):
        raise _BadRow('needs "gold" + "distractors", or "documents" (a list of strings) + "gold_index" (an int)')
    if not 0 <= gold_index < len(documents):
        raise _BadRow(f'"gold_index" {gold_index} is out of range for {len(documents)} documents')
    return _MDQARow(question, answer.strip(), documents[gold_index], documents[:gold_index] + documents[gold_index + 1 :])


def _read_mdqa(path: Path) -> list[_MDQARow]:
    """Every row of a JSONL file (blank lines skipped). All rows must hold the same number of documents:
    a position means the same place in every prompt only then."""
    path = Path(path)
    if not path.is_file():
        raise MoeforgeError(f"{path} does not exist or is not a file; give a JSONL file of question/answer/documents rows")
    rows: list[_MDQARow] = []
    first_line = 0  # where rows[0] is, for the document-count message
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = _parse_mdqa_row(json.loads(line))
        except json.JSONDecodeError as err:
            raise MoeforgeError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        except _BadRow as err:
            raise MoeforgeError(f"{path}:{number}: {err}") from None
        if rows and len(row.distractors) != len(rows[0].distractors):
            raise MoeforgeError(
                f"{path}:{number}: {len(row.distractors) + 1} documents, but line {first_line} has "
                f"{len(rows[0].distractors) + 1}; every row needs the same number so positions compare"
            )
        first_line = first_line or number
        rows.append(row)
    if not rows:
        raise MoeforgeError(f"{path} holds no rows")
    return rows


@dataclass(frozen=True)
class MDQAProbe:
    """Multi-document QA over the first ``samples`` rows of the JSONL file at ``path``; the gold document
    is put at each of ``positions`` (default: 5 evenly spread over ``0..len(distractors)``)."""

    path: Path
    positions: tuple[int, ...] | None = None
    samples: int = 50
    chat_template: bool = False

    kind: ClassVar[str] = "mdqa"
    position_of: ClassVar[str] = "gold document"

    def prompts(self) -> ProbePrompts:
        _check_samples(self.samples)
        every_row = _read_mdqa(self.path)
        rows = every_row[: self.samples]
        slots = len(rows[0].distractors) + 1
        positions = _resolve_positions(self.positions, slots, "document")
        items = []
        for sample, row in enumerate(rows):
            for position in positions:
                documents = [*row.distractors[:position], row.gold, *row.distractors[position:]]
                listed = "\n".join(f"Document [{i}] {text}" for i, text in enumerate(documents, start=1))
                user = f"{MDQA_INSTRUCTION}\n\n{listed}\n\nQuestion: {row.question}"
                items.append(ProbeItem(sample, position, user, "Answer:", f" {row.answer}"))
        return ProbePrompts(items, slots, f"mdqa: {self.path} ({len(rows)} of {len(every_row)} rows, {slots} documents)")


ProbeSpec = KVProbe | MDQAProbe
PROBE_KINDS: tuple[str, ...] = tuple(spec.kind for spec in get_args(ProbeSpec))
"""What ``moeforge eval --probe`` accepts: one name per probe spec."""


def bootstrap_ci(values: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap 95% interval of the mean: resample prompts with replacement. Seeded, so a
    report is reproducible; prompts are the unit because they are what varies between runs."""
    data = np.asarray(values, dtype=np.float64)
    means = data[np.random.default_rng(seed).integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class PositionScore:
    """Scores at one position: per-prompt values (in sample order, so they pair across positions and
    models) and their means with bootstrap 95% intervals."""

    position: int
    logprobs: tuple[float, ...]
    exact: tuple[bool, ...]
    logprob_ci: tuple[float, float]
    exact_match_ci: tuple[float, float]

    @classmethod
    def from_scores(cls, position: int, logprobs: Sequence[float], exact: Sequence[bool]) -> PositionScore:
        return cls(position, tuple(logprobs), tuple(exact), bootstrap_ci(logprobs), bootstrap_ci([float(e) for e in exact]))

    @property
    def n(self) -> int:
        return len(self.logprobs)

    @property
    def logprob(self) -> float:
        return float(np.mean(self.logprobs))

    @property
    def exact_match(self) -> float:
        return float(np.mean(self.exact))

    def to_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "n": self.n,
            "exact_match": self.exact_match,
            "exact_match_ci": list(self.exact_match_ci),
            "logprob": self.logprob,
            "logprob_ci": list(self.logprob_ci),
            "logprobs": list(self.logprobs),
            "exact": list(self.exact),
        }


def _gap(values: Sequence[float]) -> float:
    """How much the score depends on position: max - min of the per-position means (0 = flat)."""
    return max(values) - min(values)


@dataclass(frozen=True)
class ProbeResult:
    """A model's scores on a probe: ``slots`` places the fact could be (pairs or documents), the
    prompts' token-length range, and one :class:`PositionScore` per probed position."""

    spec: ProbeSpec
    description: str
    slots: int
    prompt_tokens: tuple[int, int]
    positions: tuple[PositionScore, ...]

    @property
    def position_label(self) -> str:
        return f"position of the {self.spec.position_of} (0..{self.slots - 1})"

    @property
    def exact_match_gap(self) -> float:
        return _gap([p.exact_match for p in self.positions])

    @property
    def logprob_gap(self) -> float:
        return _gap([p.logprob for p in self.positions])

    def to_dict(self) -> dict[str, Any]:
        spec = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self.spec).items()}
        return {
            "probe": self.spec.kind,
            "description": self.description,
            "spec": spec,
            "slots": self.slots,
            "prompt_tokens": list(self.prompt_tokens),
            "exact_match_gap": self.exact_match_gap,
            "logprob_gap": self.logprob_gap,
            "positions": [p.to_dict() for p in self.positions],
        }


@dataclass(frozen=True)
class _Encoded:
    """Token ids of prompt + target; ``start`` is the index of the first target token."""

    ids: list[int]
    start: int


def _encode(tokenizer: PreTrainedTokenizerBase, prompt: str, target: str, special_tokens: bool) -> _Encoded:
    """Tokenize prompt and target together, as the model would see them, and score everything after the
    longest common prefix with the prompt's own tokenization: tokenizing the target alone can split it
    differently (a leading space, a merge across the boundary) and would score tokens the model never
    reads in that order."""
    ids = tokenizer(prompt + target, add_special_tokens=special_tokens)["input_ids"]
    context = tokenizer(prompt, add_special_tokens=special_tokens)["input_ids"]
    start = 0
    while start < min(len(ids), len(context)) and ids[start] == context[start]:
        start += 1
    return _Encoded(list(ids), start)


def _accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _score_batch(model: PreTrainedModel, batch: Sequence[_Encoded], pad_id: int, keep_arg: bool) -> list[tuple[float, bool]]:
    """``(answer log-prob, exact match)`` per sequence from one right-padded forward pass.

    Right padding leaves every real token's position and (causal) context as in an unpadded pass. Only
    the logits that predict target tokens are projected onto the vocabulary (``logits_to_keep`` with
    their indices, when the model takes it): a 128k vocabulary over a long prompt is gigabytes."""
    import torch

    length = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, encoded in enumerate(batch):
        ids[row, : len(encoded.ids)] = torch.tensor(encoded.ids)
        mask[row, : len(encoded.ids)] = 1
    # logits at index t predict token t + 1
    keep = sorted({t for e in batch for t in range(e.start - 1, len(e.ids) - 1)})
    index = torch.tensor(keep, device=model.device)
    kwargs = {"logits_to_keep": index} if keep_arg else {}
    logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False, **kwargs).logits
    if not keep_arg:
        logits = logits[:, index]
    logprobs = logits.float().log_softmax(dim=-1).cpu()
    column = {t: j for j, t in enumerate(keep)}
    scores = []
    for row, encoded in enumerate(batch):
        columns = torch.tensor([column[t] for t in range(encoded.start - 1, len(encoded.ids) - 1)])
        target = torch.tensor(encoded.ids[encoded.start :])
        predicted = logprobs[row, columns]
        logprob = predicted.gather(-1, target[:, None]).sum().item()
        scores.append((logprob, bool((predicted.argmax(dim=-1) == target).all())))
    return scores


def run_probe(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: ProbeSpec,
    *,
    batch_size: int = 4,
    log: Callable[[str], None] | None = None,
) -> ProbeResult:
    """Score every prompt of ``spec`` on ``model`` (teacher-forced, batches of ``batch_size``) and
    summarise per position. Runs under ``torch.no_grad()`` in eval mode; the model's mode is restored."""
    import torch

    if batch_size < 1:
        raise MoeforgeError(f"batch_size {batch_size} must be at least 1")
    prompts = spec.prompts()
    items = prompts.items
    special_tokens = not spec.chat_template  # a rendered chat template already holds its special tokens
    encoded = [_encode(tokenizer, item.prompt(tokenizer, spec.chat_template), item.target, special_tokens) for item in items]
    lengths = [len(e.ids) for e in encoded]
    if log is not None:
        log(f"{prompts.description}: {len(items)} prompts of {min(lengths)}-{max(lengths)} tokens")
        trained = getattr(model.config, "max_position_embeddings", None)
        if trained is not None and max(lengths) > trained:
            log(f"note: prompts are longer than the model's {trained} positions")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked: any id will do
    keep_arg = _accepts_logits_to_keep(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            scores = [
                score
                for start in range(0, len(encoded), batch_size)
                for score in _score_batch(model, encoded[start : start + batch_size], pad_id, keep_arg)
            ]
    finally:
        model.train(was_training)
    by_position: dict[int, list[tuple[float, bool]]] = {}
    for item, score in zip(items, scores, strict=True):
        by_position.setdefault(item.position, []).append(score)
    positions = tuple(
        PositionScore.from_scores(position, [lp for lp, _ in group], [em for _, em in group])
        for position, group in sorted(by_position.items())
    )
    return ProbeResult(spec, prompts.description, prompts.slots, (min(lengths), max(lengths)), positions)


def _cells(score: PositionScore) -> tuple[str, str]:
    (em_low, em_high), (lp_low, lp_high) = score.exact_match_ci, score.logprob_ci
    return f"{score.exact_match:.2f} [{em_low:.2f}, {em_high:.2f}]", f"{score.logprob:.2f} [{lp_low:.2f}, {lp_high:.2f}]"


def format_table(results: Mapping[str, ProbeResult]) -> str:
    """Models side by side, one row per position: exact match and answer log-prob (nats), each as mean
    [95% CI], then the position gaps (max - min of the means). The results must come from one spec."""
    first = next(iter(results.values()))
    positions = [p.position for p in first.positions]
    if any([p.position for p in r.positions] != positions for r in results.values()):
        raise ValueError("format_table needs results over the same positions")
    rows = [("position", [("EM [95% CI]", "log-prob [95% CI]")] * len(results))]
    rows += [(str(position), [_cells(r.positions[i]) for r in results.values()]) for i, position in enumerate(positions)]
    rows.append(("gap (max-min)", [(f"{r.exact_match_gap:.2f}", f"{r.logprob_gap:.2f}") for r in results.values()]))
    label = max(len(name) for name, _ in rows)
    em = max(len(cell[0]) for _, cells in rows for cell in cells)
    lp = max(len(cell[1]) for _, cells in rows for cell in cells)
    column = max(em + 2 + lp, *(len(name) for name in results))
    n = ", ".join(sorted({str(p.n) for r in results.values() for p in r.positions}))
    lines = [
        f"{first.description}; n = {n} per position; rows: {first.position_label}",
        " " * label + "".join(f"   {name:<{column}}" for name in results),
        *(f"{name:<{label}}" + "".join(f"   {f'{a:>{em}}  {b:>{lp}}':<{column}}" for a, b in cells) for name, cells in rows),
    ]
    return "\n".join(line.rstrip() for line in lines)
