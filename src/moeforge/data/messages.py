"""Chat messages: checking them and cutting a conversation into prompt and reply.

Every conversational format (messages, ShareGPT, preference lists) ends up as ``{"role", "content"}``
dicts with exactly those two keys, because TRL recognises conversational rows by them and Arrow needs
every message in a column to have the same fields.
"""

from __future__ import annotations

from typing import Any

from moeforge.data.bad_row import BadRow

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


def type_name(value: Any) -> str:
    """``a list``, ``a number``...: how a wrong value is named in a row error."""
    names = {str: "a string", list: "a list", dict: "an object", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def describe_keys(row: dict[str, Any]) -> str:
    return ", ".join(map(str, row)) or "none"


def required_text(row: dict[str, Any], key: str) -> str:
    """``row[key]``, which must be a string with something besides whitespace."""
    if key not in row:
        raise BadRow(f"missing key {key!r} (row keys: {describe_keys(row)})")
    return checked_text(row[key], repr(key))


def checked_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise BadRow(f"{where} must be a string, got {type_name(value)}")
    if not value.strip():
        raise BadRow(f"{where} is empty")
    return value


def chat(
    row: dict[str, Any],
    key: str,
    *,
    role_key: str = "role",
    content_key: str = "content",
    roles: dict[str, str] | None = None,
) -> list[Message]:
    """``row[key]`` as checked messages; ``roles`` maps the file's role names to ours (ShareGPT's human/gpt)."""
    roles = roles or {role: role for role in ROLES}
    if key not in row:
        raise BadRow(f"missing key {key!r} (row keys: {describe_keys(row)})")
    turns = row[key]
    if not isinstance(turns, list):
        raise BadRow(f"{key!r} must be a list of messages, got {type_name(turns)}")
    if not turns:
        raise BadRow(f"{key!r} is an empty list")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise BadRow(f"{where} must be an object with {role_key!r} and {content_key!r}, got {type_name(turn)}")
        role = turn.get(role_key)
        if not isinstance(role, str) or role not in roles:
            raise BadRow(f"{where}.{role_key} is {role!r}, expected one of {', '.join(roles)}")
        messages.append({"role": roles[role], "content": checked_text(turn.get(content_key), f"{where}.{content_key}")})
    return messages


def as_messages(row: dict[str, Any], key: str, role: str) -> list[Message]:
    """``row[key]`` as messages: a plain string becomes one message with ``role``."""
    value = row.get(key)
    if isinstance(value, list):
        return chat(row, key)
    return [{"role": role, "content": required_text(row, key)}]


def single_reply(row: dict[str, Any], key: str) -> list[Message]:
    """``row[key]`` as exactly one assistant message (a string or a one-message list)."""
    messages = as_messages(row, key, "assistant")
    if len(messages) != 1:
        raise BadRow(f"{key!r} must be one assistant message (or a string), got {len(messages)} messages")
    if messages[0]["role"] != "assistant":
        raise BadRow(f"{key!r} must be an assistant message, got a {messages[0]['role']} message")
    return messages


def split_last_reply(messages: list[Message], key: str) -> tuple[list[Message], list[Message]]:
    """(everything before the last assistant message, [that message]): what SFT learns to answer.

    Messages after the last assistant reply have no answer to learn and are dropped.
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise BadRow(f"{key!r} has no assistant message to learn from")
    if last == 0:
        raise BadRow(f"{key!r} starts with the assistant reply, so nothing prompts it")
    return messages[:last], [messages[last]]
