"""The one exception a row check raises.

Row checks know what is wrong with a row but not where it came from; the loader adds the location
(``file:line`` or ``file[index]``) and either stops with a :class:`~moeforge.errors.MoeforgeError` or,
with ``skip_bad_rows``, counts the row and moves on.
"""

from __future__ import annotations


class BadRow(ValueError):
    """What is wrong with one row, e.g. ``missing key 'completion' (row keys: prompt, answer)``."""
