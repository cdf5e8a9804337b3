"""Turning pydantic's report on a recipe into one line a user can act on.

Every problem of the recipe is listed at once (fixing them one run at a time is slow), each as
``key.path: message``. An unknown key gets a did-you-mean from the keys valid at that level, or from a
key of the same name in another section (``top_k`` at the top level → ``moe.top_k``), and the line ends
with the document that lists the keys.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ValidationError

UNION_TAGS = {"int", "float", "str", "bool", "none"}
"""The names pydantic puts into an error's location for the branch of a union it tried (besides ``list[int]``-like ones)."""


def describe(error: ValidationError, model: type[BaseModel]) -> str:
    """All problems of ``error`` on one line: ``a: ...; b: ...`` (prefixed with their count when several)."""
    problems: dict[str, list[str]] = {}
    docs: list[str] = []
    for item in error.errors():
        loc = list(item["loc"])
        tag = next((i for i, part in enumerate(loc) if _is_union_tag(part, item)), len(loc))
        path = [part for part in loc if not _is_union_tag(part, item)]
        key = ".".join(str(part) for part in loc[:tag]) or "recipe"  # a union's branches report under one key
        within = ".".join(str(part) for part in path[tag:])
        if item["type"] == "extra_forbidden":
            parent, doc = _section(model, path[:-1])
            problems.setdefault(key, []).append(_unknown(str(path[-1]), path[:-1], parent, model))
            docs.append(doc)
        elif item["type"] == "missing":
            problems.setdefault(key, []).append("required key is missing")
            docs.append(_section(model, path[:-1])[1])
        else:
            problems.setdefault(key, []).append((f"at {within}: " if within else "") + _message(item))
    lines = [f"{key}: {_merge(messages)}" for key, messages in problems.items()]
    text = "; ".join(lines) if len(lines) == 1 else f"{len(lines)} problems: " + "; ".join(lines)
    if docs:
        text += f" (the keys are listed in {' and '.join(dict.fromkeys(docs))})"
    return text


def _is_union_tag(part: str | int, item: Any) -> bool:
    """``moe.num_experts.list[int]`` → the tag ``list[int]`` is pydantic's, not a key of the recipe."""
    if not isinstance(part, str) or (item["type"] == "extra_forbidden" and part == item["loc"][-1]):
        return False
    return "[" in part or part in UNION_TAGS


def _message(item: Any) -> str:
    message = item["msg"].removeprefix("Value error, ")
    got = item.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{message}{shown}"


def _merge(messages: list[str]) -> str:
    """The branches of a union tried for one key: "Input should be 'all' or a valid list (got 'x')"."""
    first, *rest = dict.fromkeys(messages)
    if not rest:
        return first
    head, _, got = first.partition(" (got ")
    tails = [message.partition(" (got ")[0].removeprefix("Input should be ") for message in rest]
    return " or ".join([head, *tails]) + (f" (got {got}" if got else "")


def _unknown(key: str, parents: list[str | int], section: type[BaseModel] | None, root: type[BaseModel]) -> str:
    """``unknown key, did you mean moe.top_k?``: a close key at this level, else the same key elsewhere."""
    prefix = "".join(f"{part}." for part in parents)
    here = set(_keys(section)) if section else set()
    everywhere = list(_all_keys(root, ""))  # (dotted path of a key, a name it goes by)
    close = difflib.get_close_matches(key, sorted(here), n=1)
    if not any(name == key for _, name in everywhere) and not close:
        close_elsewhere = difflib.get_close_matches(key, sorted({name for _, name in everywhere}), n=1)
        key = close_elsewhere[0] if close_elsewhere else key
    # shallowest first, then in the recipe's order (a set's order would vary from run to run)
    elsewhere = sorted(dict.fromkeys(path for path, name in everywhere if name == key), key=lambda path: path.count("."))
    # within the section the key was written in first (moe.placement.x for a typo in moe:, not attention_moe.placement.x)
    elsewhere = [path for path in elsewhere if path.startswith(prefix)] or elsewhere
    if close and not elsewhere and section is not None:
        elsewhere = [prefix + _canonical(section, close[0])]
    guesses = elsewhere[:2]
    return "unknown key" + (f", did you mean {' or '.join(guesses)}?" if guesses else "")


def _section(root: type[BaseModel], path: list[str | int]) -> tuple[type[BaseModel] | None, str]:
    """The model class that holds the keys at ``path``, and the nearest document listing them."""
    node: type[BaseModel] | None = root
    doc = getattr(root, "KEYS_DOC", "the README")
    for part in path:
        if node is None or isinstance(part, int):
            continue
        field = _field_named(node, part)
        node = _model_in(field.annotation) if field else None
        doc = getattr(node, "KEYS_DOC", doc)
    return node, doc


def _field_named(model: type[BaseModel], key: str) -> Any:
    for name, field in model.model_fields.items():
        if key == name or key in _aliases(name, field):
            return field
    return None


def _aliases(name: str, field: Any) -> list[str]:
    choices = getattr(field.validation_alias, "choices", [])
    return [alias for alias in [field.alias, *choices] if isinstance(alias, str) and alias != name]


def _keys(model: type[BaseModel]) -> Iterator[str]:
    """Every key the model accepts: field names (their alias where the name is Python's, ``copy_``) and aliases."""
    for name, field in model.model_fields.items():
        yield field.alias or name
        yield from _aliases(name, field)


def _canonical(model: type[BaseModel], key: str) -> str:
    field = _field_named(model, key)
    name = next(name for name, candidate in model.model_fields.items() if candidate is field)
    return field.alias or name


def _all_keys(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, str]]:
    for name, field in model.model_fields.items():
        key = field.alias or name
        yield prefix + key, key
        for alias in _aliases(name, field):
            if alias != key:
                yield prefix + key, alias
        child = _model_in(field.annotation)
        if child is not None:
            yield from _all_keys(child, f"{prefix}{key}.")


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The recipe section class inside ``X | None``, ``list[X]``, ``Annotated[X, ...]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for argument in typing.get_args(annotation):
            found = _model_in(argument)
            if found is not None:
                return found
    return None
