# Two targets, each doing its own set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip -q
	$(PY) -m pip install -r requirements.txt -q
	touch $(STAMP)

install: $(STAMP)

# The main job: demo data set (once), train the demo preset (resumed if runs/demo exists), render samples.
demo: $(STAMP)
	$(PY) dataset.py demo
	$(PY) train.py --out runs/demo $(if $(wildcard runs/demo/config.json),--resume)
	$(PY) predict.py --run runs/demo

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache
