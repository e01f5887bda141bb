# Two entry points: `make demo` (main job on the embedded world) and `make test`.
# Both create/refresh the virtual environment in .venv first; that step is a no-op
# when pyproject.toml has not changed since the last install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean-world mmdet test-mmdet

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,export,demo]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m tools.pipeline $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

# optional: mmdetection 3.3 with a CPU build of mmcv's ops (tools/install_mmdet.sh; the
# first build took 76 minutes here at nice 10 beside other jobs, then its wheel is cached)
mmdet: $(STAMP)
	VENV=$(VENV) ./tools/install_mmdet.sh

test-mmdet: mmdet
	$(PY) -m pytest -q tests/test_mmdet.py $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
