"""Adapter directories (``adapter_config.json``, PEFT's layout): recognising one and the base model it records.

Plain JSON reading, no PEFT: loading code decides what to load before any heavy import.
"""

from __future__ import annotations

import json
from pathlib import Path

from moeforge.errors import MoeforgeError


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def base_model_of(adapter_dir: str | Path) -> str | None:
    """The base model an adapter directory records (``base_model_name_or_path``), if any."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    try:
        recorded = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise MoeforgeError(f"{config_path} is not readable JSON ({type(err).__name__}); re-save the adapter") from None
    return recorded if isinstance(recorded, str) and recorded else None
