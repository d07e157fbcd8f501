# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Demo size: `make demo` (default, ~10 min on 2 cores) or e.g. `make demo DEMO_PATIENTS=1000 DEMO_MINUTES=30`.
DEMO_DIR ?= demo_out
DEMO_PATIENTS ?= 250
DEMO_MINUTES ?= 6
DEMO_DIFFICULTY ?= 0.2
DEMO_PORT ?= 8765

.PHONY: install demo demo-large test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[train,serve,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	DEMO_DIR=$(DEMO_DIR) DEMO_PATIENTS=$(DEMO_PATIENTS) DEMO_MINUTES=$(DEMO_MINUTES) \
	DEMO_DIFFICULTY=$(DEMO_DIFFICULTY) DEMO_PORT=$(DEMO_PORT) BIN=$(BIN) bash scripts/demo.sh

demo-large:
	$(MAKE) demo DEMO_PATIENTS=1000 DEMO_MINUTES=30

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check medvision training serving tests

clean:
	rm -rf $(DEMO_DIR) build dist *.egg-info
