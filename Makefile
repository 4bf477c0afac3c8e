# The two Quick start targets (demo, test) create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch: an unpinned torch resolves to a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-fast lint bench stack-up stack-down clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip uninstall --quiet --yes decord 2>/dev/null || true  # an older venv's decord 0.6: decord2 replaces it
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed  ## pretrain on the embedded default (local Ray, generated videos, local MLflow)
	$(PY) jobs/pretrain.py

test: $(VENV)/.installed  ## lint + the whole test suite, unit and integration
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --timeout=600 --durations=25

test-fast: $(VENV)/.installed  ## unit tests only
	$(PY) -m pytest -q -m "not integration" --timeout=300

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(VENV)/.installed  ## every benchmark, each printing its table and ratio
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

stack-up: $(VENV)/.installed  ## local Ray head + S3 server + MLflow server on 127.0.0.1 (infra/local)
	$(PY) infra/local/stack.py up

stack-down: $(VENV)/.installed
	$(PY) infra/local/stack.py down

clean:
	rm -rf $(VENV) .cache runs mlruns
