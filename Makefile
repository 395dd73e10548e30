# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first and pinned so that pip takes the local CPU wheel instead of the
# multi-GB CUDA build; GPU users install their own torch before `make` (see README).
TORCH ?= torch==2.13.0

.PHONY: demo test gpu-test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[demo]"
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test,demo,bench,quant,mlflow,wandb]"
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/python examples/demo/make_digits.py .demo-data/digits
	$(BIN)/visiontune train examples/demo/digits_vit_lora.yaml --overwrite

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

# On a GPU machine: every task's tiny model in bf16 and fp16, eval, predict, resume, peak memory.
gpu-test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m gpu -v -s tests/gpu

bench: $(VENV)/.installed-test
	$(BIN)/python bench/classify_throughput.py

clean:
	rm -rf $(VENV) .demo-data runs
