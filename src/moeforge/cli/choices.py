"""The values a CLI option offers, read from the typed config it mirrors.

An option that mirrors a recipe field offers exactly what recipes accept: its choices come from the
field's ``Literal`` annotation, so a value added to a recipe type (``preset: moice``) is a valid flag value
at once, and the two cannot drift apart.
"""

from __future__ import annotations

from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel


def literal_values(annotation: Any) -> list[Any]:
    """The values of ``annotation``: a ``Literal``, or an optional, union or ``list[...]`` of ``Literal``s.

    Anything else (``str``, ``float | Literal[...]``) has no closed set of values, so offering choices for
    it would reject valid input: that is a programming error, raised as :class:`TypeError`."""
    origin = get_origin(annotation)
    if origin is Literal:
        return list(get_args(annotation))
    if origin in (Union, UnionType, list):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        if members:
            return [value for member in members for value in literal_values(member)]
    raise TypeError(f"{annotation!r} is not a Literal (or an optional / list of one): it has no closed set of values")


def field_choices(model: type[BaseModel], field: str) -> list[Any]:
    """The values recipe field ``model.field`` accepts, for an option's ``choices=``."""
    return literal_values(model.model_fields[field].annotation)
