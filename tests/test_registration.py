"""``import moeforge`` is light, and moeforge is registered with transformers and PEFT whichever is imported first."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft", "trl", "datasets")

REGISTERED = """
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from moeforge.io import extensions
import peft
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
print("moeforge" in CONFIG_MAPPING, "moeforge_auto" in ALL_EXPERTS_FUNCTIONS, "moice" in extensions._CONFIG_EXTENSIONS,
      "MOE_LORA" in PEFT_TYPE_TO_CONFIG_MAPPING, bool(extensions._ADAPTER_LOADERS))
"""


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_import_moeforge_imports_nothing_heavy() -> None:
    code = f"import sys, moeforge; print([m for m in {HEAVY!r} if m in sys.modules])"
    assert _run(code) == "[]"


@pytest.mark.parametrize(
    "first",
    [
        "import moeforge",  # then transformers and PEFT, as a user would
        "import transformers; import moeforge",  # transformers already there
        "import peft; import moeforge",
        "import moeforge.modeling.routers",  # a registrant's own import pulls transformers in
        "import moeforge.experts",
        "import moeforge.adapters",
        "import moeforge.io.loading",
        "import moeforge.training.runner",
        # a look without an import (transformers checks whether PEFT is installed) must not spend the hook
        "import moeforge, importlib.util; importlib.util.find_spec('peft'); importlib.util.find_spec('transformers')",
    ],
)
def test_registered_whichever_comes_first(first: str) -> None:
    assert _run(first + "\n" + REGISTERED) == "True True True True True"


def test_a_moeforge_checkpoint_loads_with_plain_auto_classes_after_import_moeforge(tiny_llama_dir) -> None:
    from tests.conversion.conftest import run_convert

    out = tiny_llama_dir.parent / "moe"
    run_convert(tiny_llama_dir, out, {"num_experts": 4, "top_k": 2}, export="moeforge")
    code = f"import moeforge\nfrom transformers import AutoModelForCausalLM\nprint(type(AutoModelForCausalLM.from_pretrained({str(out)!r})).__name__)"
    assert _run(code) == "MoeforgeLlamaForCausalLM"


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["train", "--help"],
        ["convert", "--help"],
        ["eval", "--help"],
        ["convert", "{bad}"],
        ["train", "{bad}"],
        ["plan", "{bad}"],
    ],
)
def test_the_first_answer_needs_no_torch(argv: list[str], tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: default\noutput: out\nmoe: {top_k: 0}\nstage: sft\n")  # invalid as either kind
    argv = [arg.format(bad=bad) for arg in argv]
    code = (
        "import sys\nfrom moeforge.cli.main import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stderr.strip().splitlines()[-1] == "[]"
