# Two main targets, each doing its own set-up: `make demo` and `make test` (`make lint` runs in CI first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format install gpu-check clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip -q
	$(PY) -m pip install -r requirements-dev.txt -q
	touch $(STAMP)

install: $(STAMP)

# The demo data set, made when missing or when prepare.py (which writes it) is newer than its
# manifest (`dataset.py demo` replaces an older version, and leaves a current one as it is).
DEMO_DATA := data/demo/manifest.json
$(DEMO_DATA): prepare.py | $(STAMP)
	$(PY) dataset.py demo
	touch $@

# The main job: demo data set (once), train the demo preset (resumed if runs/demo exists), render
# samples with their tissue masks (image + mask pairs) and the figures of its conditions and masks,
# with DPM-Solver++(2M) 20 steps: the fast sampler, whose samples match DDIM 50's (README, Samplers).
demo: $(STAMP) $(DEMO_DATA)
	$(PY) train.py --out runs/demo $(if $(wildcard runs/demo/config.json),--resume)
	$(PY) predict.py --run runs/demo --pairs 16 --sampler dpmpp

# Two pytest workers (pytest-xdist): most tests are single-threaded tracing and Python, so a
# 2-core machine runs two at once. loadfile: each test file runs on one worker, so a file's
# session fixtures (a trained run, a subprocess's measurements) are made once (xdist's
# loadgroup, by marks, does nothing under pytest 9: it renames node ids that pytest 9 no
# longer reads). TEST_WORKERS=0 runs them in this process, one at a time.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# On a GPU machine: TensorFlow's CUDA libraries into the same .venv, then gpu_check.py (a few
# minutes: both stages in each precision, XLA off/on, one GPU and mirrored, a resume; writes
# gpu_check.json and its table in BENCHMARKS.md).
GPU_STAMP := $(VENV)/.installed-gpu
$(GPU_STAMP): $(STAMP) requirements-gpu.txt
	$(PY) -m pip install -r requirements-gpu.txt -q
	touch $(GPU_STAMP)

gpu-check: $(GPU_STAMP)
	$(PY) gpu_check.py

# Lint (pyflakes, pycodestyle errors, isort, bugbear, pyupgrade) and formatting, as configured in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Apply the formatter and the safe lint fixes.
format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache
