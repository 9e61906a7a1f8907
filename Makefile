# kiln: `make demo` and `make test` are the two commands a fresh machine needs (README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# One pip command with the pins: installing anything after torch without them pulls a CUDA torch
# and ~17 nvidia wheels; sentencepiece 0.2.3 needs protobuf 7, which apache-beam caps below 7.
PINS := torch==2.13.0 torchvision==0.28.0 sentencepiece==0.2.2
STAMP := $(VENV)/.kiln-installed

.PHONY: venv demo test test-fast bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(PINS) -e '.[test,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kiln demo --workdir build/demo --rows 500

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Everything except the end-to-end runs marked slow.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python bench/download.py

clean:
	rm -rf build .pytest_cache
