# lorasweep: `make demo` to watch a sweep, `make test` to run the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLUSTER := $(PY) -m devcluster

.PHONY: setup test lint demo demo-down cluster-up cluster-down cluster-status operator-up operator-down \
	bins tools crds bench clean chart-lint

setup: $(VENV)/.installed  ## create .venv with the operator, trainer and dev dependencies

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[operator,trainer,dev]'
	touch $@

test: setup  ## the whole suite; starts the test cluster when none is running
	$(VENV)/bin/pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bins:  ## build the cluster binaries into ~/.cache/lorasweep (once per version)
	LORASWEEP_SKIP_TOOLS=1 bash devcluster/build-bins.sh

tools:  ## also build helm and kubeconform
	bash devcluster/build-bins.sh

cluster-up: setup  ## start the dev cluster and MLflow; writes .cluster/kubeconfig and .cluster/env
	$(CLUSTER) up

cluster-down:  ## stop every process cluster-up started and remove .cluster/
	$(CLUSTER) down

cluster-status:
	$(CLUSTER) status

operator-up: setup  ## apply the CRD and run the operator in the background (.cluster/operator.log)
	$(CLUSTER) operator-up

operator-down:
	$(CLUSTER) operator-down

crds: setup  ## regenerate the CRD from the pydantic API models
	$(PY) -m sweep_operator.crd > crds/hyperparametersweeps.lorasweep.io.yaml

demo: setup  ## a real LoRA sweep on the dev cluster, followed to the end; `make demo-down` stops it
	$(CLUSTER) up
	$(CLUSTER) operator-up
	$(PY) -m devcluster.demo

demo-down:  ## stop the demo's cluster, operator and MLflow; remove .cluster/ and .demo/
	$(CLUSTER) down
	rm -rf .demo

clean: cluster-down
	rm -rf $(VENV)

chart-lint: setup  ## helm lint, kubeconform (schemas from the dev cluster) and the values schema
	$(VENV)/bin/pytest tests/chart/test_chart.py
