"""User-facing errors.

Every problem caused by the user's input (a recipe, a model path, a data file) is raised as a
:class:`MoeforgeError`. The CLI prints its message on one line and exits with code 2; the Python API
lets it propagate. Messages name the culprit and say what to do, so no traceback is needed.
"""

from __future__ import annotations


class MoeforgeError(Exception):
    """Bad input: a one-line message that names the culprit and the fix. CLI exit code 2."""

    exit_code = 2


class FidelityError(MoeforgeError):
    """A conversion that must be exact (e.g. copy upcycling with renormalised top-k) was not."""
