# Everything runs from a virtual environment the first target creates.
# `make run` runs the main job, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Test processes (pytest-xdist): most of a test's time is a server, worker or
# job subprocess starting TensorFlow, so two processes keep both of CI's cores
# busy. Files stay whole on one process (module fixtures are built once).
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

.PHONY: run bench bench-measure test test-slow lint system-deps clean

# secateur-client (packaging/client/) is built from this repository, not fetched
# from PyPI: one pip run takes it with the full distribution, which depends on it.
# Both are uninstalled first: in a venv made before the split, `secateur` owns
# bin/secateur, and replacing it would delete the script the client installs.
$(STAMP): pyproject.toml packaging/client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip uninstall --quiet --quiet --yes secateur secateur-client
	$(PY) -m pip install --quiet -e ./packaging/client -e '.[dev]'
	touch $(STAMP)

## The main job on the embedded default: train VGG-16-BN on bundled digits, prune
## a sweep, fine-tune, measure original vs pruned, publish a TF Serving version.
run: $(STAMP)
	$(VENV)/bin/secateur demo

## Time to plan and apply a prune on five keras.applications models, to
## import five SavedModels as data against tf.saved_model.load, and what a CI
## stage pays to install secateur-client alone (wheel size, install time), and
## how well the measured cost model predicts step time (FLOPs, predicted, measured).
bench: $(STAMP)
	$(PY) benchmarks/prune_speed.py
	$(PY) benchmarks/import_speed.py
	$(PY) benchmarks/client_install.py
	$(PY) benchmarks/target_accuracy.py

## The study's VGG-16-BN: train step time and peak memory vs pruned ratio.
bench-measure: $(STAMP)
	$(PY) benchmarks/measure.py

## Lint, type-check, then the default test suite (slow tests excluded).
test: lint system-deps
	$(PYTEST)

## A real Prometheus server for the metrics tests and a real PostgreSQL for the
## job store tests (Debian packages; root only, otherwise those tests skip and
## say why), and buf (npm @bufbuild/buf, into
## .tools/) for the contract's lint test. Node.js/npm come with the machine.
system-deps:
	@command -v prometheus >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "note: prometheus is not installed; the Prometheus scrape tests will skip"; fi; }
	@command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends postgresql >/dev/null; \
	  else echo "note: PostgreSQL is not installed; the PostgreSQL store tests will skip"; fi; }
	@test -x .tools/node_modules/.bin/buf || { \
	  if command -v npm >/dev/null 2>&1; then \
	    npm install --silent --no-save --prefix .tools @bufbuild/buf >/dev/null; \
	  else echo "note: npm is missing; the buf lint test (tests/test_buf_lint.py) will skip"; fi; }

## The heavy keras.applications models (ConvNeXt-XL, EfficientNet-B7, ...).
test-slow: $(STAMP)
	$(PYTEST) -m slow

lint: $(STAMP)
	mkdir -p .typecheck/secateur && for d in pruner server client cli; do ln -sfn ../../$$d .typecheck/secateur/$$d; done; ln -sfn ../../proto/secateur/v1 .typecheck/secateur/v1
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .typecheck .pytest_cache .mypy_cache .ruff_cache build *.egg-info
