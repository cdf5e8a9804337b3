"""The one type of every seed a recipe holds.

Seeds reach numpy (``transformers.set_seed``), which only takes 0 ≤ seed < 2**32; a larger one would pass
validation and fail mid-run with a traceback, so the recipe refuses it by name instead.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

Seed = Annotated[int, Field(ge=0, lt=2**32)]
