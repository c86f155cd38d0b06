# leuko: every target creates what it needs (virtual environment, data) itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= data
PREPARED ?= prepared
PYTEST_ARGS ?=

.PHONY: setup data prepared test test-fast mlflow-ui clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install leuko with everything in pyproject.toml

$(DATA)/manifest.csv: $(STAMP)
	$(BIN)/leuko phantoms --out $(DATA)

data: $(DATA)/manifest.csv  ## make the default phantom cohort in data/

$(PREPARED)/meta.json: $(DATA)/manifest.csv
	$(BIN)/leuko prepare --manifest $(DATA)/manifest.csv --out $(PREPARED)

prepared: $(PREPARED)/meta.json  ## validate and cache the default cohort in prepared/

test: $(STAMP)  ## run the whole test suite (slow tests included)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)  ## run the tests not marked slow
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

mlflow-ui: $(STAMP)  ## open the MLflow UI on the project's store (http://127.0.0.1:5000)
	$(BIN)/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --host 127.0.0.1 --port 5000

clean:  ## remove generated data, runs and caches (keeps .venv)
	rm -rf $(DATA) $(PREPARED) runs lightning_logs .pytest_cache
