# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Demo size: `make demo` (default, ~14 min on 2 cores after the install), `make demo-large`, or e.g.
# `make demo DEMO_PATIENTS=1000 DEMO_MINUTES=20 DEMO_EPOCHS=60 DEMO_DIFFICULTY=0.3`.
DEMO_DIR ?= demo_out
DEMO_PATIENTS ?= 400
DEMO_MINUTES ?= 7
DEMO_DIFFICULTY ?= 0.1
DEMO_PORT ?= 8765
DEMO_EPOCHS ?= 45
DEMO_KEEP_SERVING ?= 1  # 0: stop the service when the demo ends (default: keep it up for the review UI)

.PHONY: install demo demo-large test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[train,serve,batch,dev,cpu]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	DEMO_DIR=$(DEMO_DIR) DEMO_PATIENTS=$(DEMO_PATIENTS) DEMO_MINUTES=$(DEMO_MINUTES) \
	DEMO_DIFFICULTY=$(DEMO_DIFFICULTY) DEMO_PORT=$(DEMO_PORT) DEMO_EPOCHS=$(DEMO_EPOCHS) KEEP_SERVING=$(DEMO_KEEP_SERVING) BIN=$(BIN) \
	bash scripts/demo.sh

demo-large:
	$(MAKE) demo DEMO_PATIENTS=1500 DEMO_MINUTES=40 DEMO_EPOCHS=80

test: install
	@bash scripts/system_tools.sh $(if $(filter 1,$(INSTALL_TOOLS)),install,check)
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check medvision training serving tests benchmarks fuzz

clean:
	rm -rf $(DEMO_DIR) build dist *.egg-info
