# Two commands set everything up: `make quickstart` and `make test`.
# The set-up runs again only when pyproject.toml changes (the stamp file in .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.wrn-cluster-installed
# The torch pair the build machines install from local files; pyproject admits it.
TORCH := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: quickstart test test-fast lint format setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)
	@echo "set-up done: $(VENV)"

quickstart: $(STAMP)
	$(VENV)/bin/wrn-cluster submit jobs/quickstart.yaml

# Everything: the layers contract, the unit tier in two processes (its tests share nothing),
# then the integration and e2e tiers in one: each of their Ray Train runs keeps both cores busy.
test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest tests/unit -n 2 $(PYTEST_ARGS)
	$(PY) -m pytest tests/integration tests/e2e $(PYTEST_ARGS)

# The unit tier only: no Ray, no servers.
test-fast: $(STAMP)
	$(PY) -m pytest tests/unit -n 2 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf .wrn-cluster .pytest_cache
