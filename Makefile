# leuko: every target creates what it needs (virtual environment, data) itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= data
PREPARED ?= prepared
PYTEST_ARGS ?=
# test processes (pytest-xdist; a test file stays in one process, so its module fixtures are made once): 0 for one process
TEST_WORKERS ?= 2
# make sweep: the search space, its wall-time budget and/or new trials (default: the sweep file's), worker processes, extra configs
# layered on every trial (e.g. conf/trainer/gpu.yaml), study storage (journal file or database URL).
SWEEP   ?= conf/sweep/default.yaml
TRIALS  ?=
BUDGET  ?=
WORKERS ?= 1
CONFIG  ?=
STORAGE ?=
MODEL_NAME ?= leuko
# make mlflow-server: a tracking + registry server for a team or a cluster
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5001
MLFLOW_BACKEND ?= sqlite:///mlflow-server/mlflow.db
MLFLOW_ARTIFACTS ?= mlflow-server/artifacts

.PHONY: setup postgres lint data prepared sweep test test-fast mlflow-ui mlflow-server clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install leuko with everything in pyproject.toml

# The cluster-path tests start a real PostgreSQL server on loopback: Debian's package provides it.
POSTGRES_INITDB = $(firstword $(shell command -v initdb 2>/dev/null) $(wildcard /usr/lib/postgresql/*/bin/initdb))
postgres:  ## install the PostgreSQL server (Debian package) when it is missing; the tests start one on loopback
	@if [ -z "$(POSTGRES_INITDB)" ]; then \
	  echo "installing Debian's postgresql package (server binaries for the database tests)"; \
	  $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq postgresql >/dev/null; \
	fi

$(DATA)/manifest.csv: $(STAMP)
	$(BIN)/leuko phantoms --out $(DATA)
ifeq ($(DATA),data)
	@# The cohort is byte-identical on every machine: this only puts it in DVC's cache (so `dvc push` has it)
	@# and checks that data.dvc, which `dvc commit` would rewrite for other data, is unchanged.
	$(BIN)/dvc commit --force --quiet data.dvc
	@if git rev-parse --git-dir >/dev/null 2>&1 && ! git diff --quiet -- data.dvc; then \
	  echo "make data: data/ is not the version data.dvc records (git diff data.dvc); git checkout data.dvc to undo" >&2; \
	  exit 1; fi
endif

data: $(DATA)/manifest.csv  ## make the default phantom cohort in data/

$(PREPARED)/meta.json: $(DATA)/manifest.csv params.yaml
	$(BIN)/leuko prepare --params params.yaml --manifest $(DATA)/manifest.csv --out $(PREPARED)

prepared: $(PREPARED)/meta.json  ## validate and cache the default cohort in prepared/

sweep: $(PREPARED)/meta.json  ## Optuna sweep over the model families, then register the best (BUDGET=10m TRIALS= WORKERS= CONFIG= SWEEP= STORAGE=)
	$(BIN)/leuko sweep --space $(SWEEP) --workers $(WORKERS) $(if $(TRIALS),--trials $(TRIALS)) $(if $(BUDGET),--budget $(BUDGET)) $(foreach c,$(CONFIG),--config $(c)) $(if $(STORAGE),--storage $(STORAGE)) --data.prepared_dir $(PREPARED)
	$(BIN)/leuko register --space $(SWEEP) --name $(MODEL_NAME) $(if $(STORAGE),--storage $(STORAGE))

lint: $(STAMP)  ## ruff lint and format check, and the import contracts (no circles, layers)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

# pytest exits 5 when it collected no test: make treats that as a failure, as it should.
test: $(STAMP) postgres lint  ## lint, then the whole test suite (slow tests included)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: $(STAMP) lint  ## lint, then the tests not marked slow
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

mlflow-ui: $(STAMP)  ## open the MLflow UI on the project's store (http://127.0.0.1:5000)
	$(BIN)/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --host 127.0.0.1 --port 5000

mlflow-server: $(STAMP)  ## MLflow tracking + registry server: database + artifact folder, on MLFLOW_HOST:MLFLOW_PORT
	mkdir -p $(MLFLOW_ARTIFACTS) $(if $(filter sqlite:///%,$(MLFLOW_BACKEND)),$(dir $(patsubst sqlite:///%,%,$(MLFLOW_BACKEND))))
	@echo "clients: export MLFLOW_TRACKING_URI=http://$(MLFLOW_HOST):$(MLFLOW_PORT)  (then make sweep, leuko predict ...)"
	$(BIN)/mlflow server --backend-store-uri $(MLFLOW_BACKEND) --artifacts-destination $(MLFLOW_ARTIFACTS) --host $(MLFLOW_HOST) --port $(MLFLOW_PORT)

clean:  ## remove generated data, runs and caches (keeps .venv)
	rm -rf $(DATA) $(PREPARED) runs lightning_logs .pytest_cache
