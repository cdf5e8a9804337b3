"""Number formatting the commands that print model sizes share."""


def human_count(n: int) -> str:
    """``1234567`` -> ``1.23M`` (parameter counts in tables)."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
