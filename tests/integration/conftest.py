"""Integration tests: real embedded models (markers smollm2, gemma3) and whole workflows over every family."""

from tests.families.conftest import family_sources  # noqa: F401  (fixture)
