# Stormwatch: the two commands of the README, and the pieces they are made of.
#   make demo   simulate a day of fleet traffic with incidents, replay it, show the alerts
#   make test   lint, type-check and run every test (starts its own Kafka broker on 127.0.0.1,
#               installs headless Chromium for the dashboard test when missing)

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint unit integration browser bench scorecard schemas clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/detector demo

test: $(STAMP) lint browser
	$(BIN)/python -m pytest -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check detector tests
	$(BIN)/ruff format --check detector tests
	$(BIN)/mypy
	$(BIN)/detector schemas --check

unit: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider -m "not integration"

integration: $(STAMP) browser
	$(BIN)/python -m pytest -p no:cacheprovider -m integration

browser:  # headless Chromium and chromedriver for the dashboard test (Debian packages)
	bash deploy/browser/install.sh

bench: $(STAMP)
	$(BIN)/detector bench replay
	$(BIN)/detector bench sessions

scorecard: $(STAMP)
	$(BIN)/detector scorecard --seeds 1 2 3 --days 3

schemas: $(STAMP)
	$(BIN)/detector schemas --write

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache

include deploy/kafka/kafka.mk
