"""Calibration tokens: a user's text file, or a built-in sample taken from what is already installed.

The built-in sample is the documentation of Python's standard library (English prose with code and
numbers), read through ``pydoc`` at run time: nothing is downloaded and nothing large is shipped.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

import torch

from moeforge.config.recipe import Calibration
from moeforge.errors import MoeforgeError

_BUILTIN_MODULES = (
    "json",
    "collections",
    "argparse",
    "pathlib",
    "textwrap",
    "datetime",
    "functools",
    "itertools",
    "statistics",
    "fractions",
    "decimal",
    "csv",
    "heapq",
    "bisect",
    "string",
    "calendar",
    "random",
    "shutil",
    "tempfile",
    "logging",
    "unittest",
    "dataclasses",
    "enum",
    "typing",
    "contextlib",
)


def builtin_text() -> str:
    """Docstrings of standard-library modules and their public members, in a fixed order."""
    parts: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # typing's deprecated aliases warn on access
        for name in _BUILTIN_MODULES:
            parts.extend(_module_docs(importlib.import_module(name)))
    return "\n\n".join(p for p in parts if p)


def _module_docs(module) -> list[str]:
    parts = [inspect.getdoc(module) or ""]
    for attr in sorted(vars(module)):
        member = getattr(module, attr)
        if not attr.startswith("_") and (inspect.isfunction(member) or inspect.isclass(member)):
            parts.append(inspect.getdoc(member) or "")
    return parts


def calibration_ids(spec: Calibration, tokenizer, vocab_size: int, generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """``[num_sequences, sequence_length]`` token ids and a one-line description of where they came from.

    Without a tokenizer (tiny test models) the tokens are seeded random ids: still a valid input for
    the fidelity check, which compares two models on the same tokens."""
    shape = (spec.num_sequences, spec.sequence_length)
    needed = spec.num_sequences * spec.sequence_length
    if tokenizer is None:
        return torch.randint(vocab_size, shape, generator=generator), "random token ids (the source has no tokenizer)"
    if spec.file is not None:
        if not spec.file.is_file():
            raise MoeforgeError(
                f"calibration.file: {spec.file} does not exist; give a plain-text file or remove the key to use the built-in sample"
            )
        text, origin = spec.file.read_text(errors="replace"), str(spec.file)
    else:
        text, origin = builtin_text(), "built-in sample (Python standard-library documentation)"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) == 0:
        raise MoeforgeError(f"calibration.file: {spec.file} holds no text")
    ids = torch.tensor(ids, dtype=torch.long)
    if len(ids) < needed:
        ids = ids.repeat(needed // len(ids) + 1)
    return ids[:needed].reshape(shape), origin
