"""The row formats moeforge reads, how each is recognised, and how each becomes a canonical record.

Canonical records are what the trainers take (TRL's conversational shapes for sft and dpo):

- pt: ``{"text": str}``
- sft: ``{"prompt": [messages], "completion": [assistant message]}``
- dpo: ``{"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}``

A file's format is recognised from the keys of its first row that has a known set of them, so one odd
row at the top does not hide the format from the rest; every row is then checked against that format.
"""

from __future__ import annotations

from typing import Any, Literal

from moeforge.data.bad_row import BadRow
from moeforge.data.messages import (
    as_messages,
    chat,
    describe_keys,
    required_text,
    single_reply,
    split_last_reply,
    type_name,
)

Stage = Literal["pt", "sft", "dpo"]
STAGES: tuple[Stage, ...] = ("pt", "sft", "dpo")

FORMAT_STAGE: dict[str, Stage] = {
    "text": "pt",
    "prompt_completion": "sft",
    "alpaca": "sft",
    "sharegpt": "sft",
    "messages": "sft",
    "preference": "dpo",
}

# first match wins: a preference row also has "prompt", an alpaca row may also have "text"
_SIGNATURES: tuple[tuple[str, frozenset[str]], ...] = (
    ("messages", frozenset({"messages"})),
    ("sharegpt", frozenset({"conversations"})),
    ("preference", frozenset({"chosen", "rejected"})),
    ("alpaca", frozenset({"instruction", "output"})),
    ("prompt_completion", frozenset({"prompt", "completion"})),
    ("text", frozenset({"text"})),
)

EXPECTED_KEYS = "text | prompt+completion | instruction+output | conversations | messages | prompt+chosen+rejected"

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def detect_format(row: Any) -> str | None:
    """The format whose keys ``row`` has, or None."""
    if not isinstance(row, dict):
        return None
    keys = set(row)
    return next((name for name, needed in _SIGNATURES if needed <= keys), None)


def to_record(fmt: str, row: Any) -> dict[str, Any]:
    """The canonical record of ``row`` read as ``fmt``; :class:`BadRow` says what is wrong with it."""
    if not isinstance(row, dict):
        raise BadRow(f"the row is {type_name(row)}, not an object with keys like {EXPECTED_KEYS}")
    return _CONVERTERS[fmt](row)


def _text(row: dict[str, Any]) -> dict[str, Any]:
    return {"text": required_text(row, "text")}


def _prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": as_messages(row, "prompt", "user"), "completion": single_reply(row, "completion")}


def _alpaca(row: dict[str, Any]) -> dict[str, Any]:
    instruction = required_text(row, "instruction")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise BadRow(f"'input' must be a string, got {type_name(extra)}")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return {"prompt": [{"role": "user", "content": prompt}], "completion": single_reply(row, "output")}


def _sharegpt(row: dict[str, Any]) -> dict[str, Any]:
    messages = chat(row, "conversations", role_key="from", content_key="value", roles=SHAREGPT_ROLES)
    prompt, completion = split_last_reply(messages, "conversations")
    return {"prompt": prompt, "completion": completion}


def _messages(row: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = split_last_reply(chat(row, "messages"), "messages")
    return {"prompt": prompt, "completion": completion}


def _preference(row: dict[str, Any]) -> dict[str, Any]:
    """Replies may repeat the conversation (``chosen: [user, assistant]``, as in UltraFeedback); without a
    ``prompt`` key that shared conversation is the prompt (TRL's "implicit prompt")."""
    replies = {key: as_messages(row, key, "assistant") for key in ("chosen", "rejected")}
    for key, messages in replies.items():
        if messages[-1]["role"] != "assistant":
            raise BadRow(f"{key!r} must end with an assistant message")
    if "prompt" in row:
        prompt = as_messages(row, "prompt", "user")
        for key, messages in replies.items():
            if len(messages) > 1 and messages[:-1] != prompt:
                raise BadRow(f"{key!r} repeats a conversation that differs from 'prompt'; give only the reply")
    else:
        prompt = replies["chosen"][:-1]
        if not prompt or prompt != replies["rejected"][:-1]:
            raise BadRow(f"missing key 'prompt' (row keys: {describe_keys(row)})")
    return {"prompt": prompt, "chosen": replies["chosen"][-1:], "rejected": replies["rejected"][-1:]}


_CONVERTERS = {
    "text": _text,
    "prompt_completion": _prompt_completion,
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "messages": _messages,
    "preference": _preference,
}
