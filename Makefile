# Two entry points that work on a fresh machine with only Python and pip.
#   make demo  - upcycle the embedded SmolLM2-135M-Instruct into an 8-expert top-2 MoE (fidelity report),
#                SFT it briefly on a built-in dataset (eval before/after, plots), compare, chat
#   make test  - lint (ruff), type-check (mypy) and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moeforge-installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch when the machine offers it; otherwise whatever torch pip resolves.
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q "torch>=2.4,<3"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf demo-out
	$(VENV)/bin/moeforge convert recipes/demo.yaml
	$(VENV)/bin/moeforge inspect demo-out/smollm2-moe-8x-top2
	$(VENV)/bin/moeforge train recipes/demo-train.yaml
	$(VENV)/bin/moeforge eval demo-out/sft/model --compare demo-out/smollm2-moe-8x-top2 --max-length 256 --max-batches 2
	$(VENV)/bin/moeforge chat demo-out/sft/model --prompt "What is the capital of France?" --max-new-tokens 40

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/convert.py

clean:
	rm -rf $(VENV) demo-out
