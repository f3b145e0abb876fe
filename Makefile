# Set-up and entry points. Everything installs into .venv with the pinned versions.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-triton bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/generate.py

test: $(STAMP)
	$(PY) -m pytest -q

test-triton: $(STAMP)
	$(PY) -m pytest -q -m triton

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
