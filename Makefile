# medseg quick start. Needs only Python >= 3.10 with pip (and make).
#   make demo   set up .venv, then run the main job on the sample data
#   make test   set up .venv (with test extras), then run the test suite (python -m pytest)
# PyTorch is installed first on its own so that the CPU build is used where one is available;
# override with e.g. `make demo TORCH="torch --index-url <your index>"`.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv install install-test demo test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

venv: $(PY)

install: venv
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e .

install-test: venv
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"

demo: install
	$(PY) -m medseg demo --out out/demo

test: install-test
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) out build *.egg-info
