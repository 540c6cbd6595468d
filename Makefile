# Set-up and the two entry points of the README. `make demo` runs the main job, `make test` the tests.
# A fresh machine needs only python3: `setup` builds .venv, installing the CPU torch wheel *first* so that
# no later requirement pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export GRADIO_ANALYTICS_ENABLED ?= False
export HF_HUB_DISABLE_TELEMETRY ?= 1

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python examples/demo.py --output-dir outputs/demo

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python benchmarks/bench_tokenizer.py
	$(BIN)/python benchmarks/bench_mergear.py

clean:
	rm -rf $(VENV) outputs
