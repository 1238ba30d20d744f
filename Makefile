# The two commands of the README. Both install what they need first (scripts/setup.sh).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/hwnas demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy hwnas exporters

test: lint
	OMP_NUM_THREADS=2 $(PY) -m pytest -q
