# Two commands do all set-up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PY311 := $(shell scripts/find_python.sh 3.11)
VENV := .venv
VENV310 := .venv-py310
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STAMP310 := $(VENV310)/.installed
# Extra test dependencies of the core suite (JAX for the cross-check against its TPU table).
TEST_EXTRAS := jax==0.10.2 matplotlib ruff

.PHONY: run test test-core test-py310 test-integration bench fuzz lint mutate clean

# xpk's TPU table is compared with the catalog's slice data (tests/test_slices.py). xpk pins
# kubernetes, docker and google-cloud clients; the test reads one module of it as data, so it
# is installed without its dependencies, at the version tests/data/slices/xpk_differences.toml
# was written against.
XPK := xpk==1.16.0

# The vLLM plugin installs without vLLM (its entry points import nothing heavy): the core venvs
# carry it so its tpu_registry side (settings, doctor) and the import contracts are checked.
PLUGINS := -e plugins/tpu-registry-gce -e plugins/tpu-registry-vllm

$(STAMP): pyproject.toml plugins/tpu-registry-gce/pyproject.toml plugins/tpu-registry-vllm/pyproject.toml
	$(PY311) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]' $(TEST_EXTRAS)
	$(BIN)/pip install -q --disable-pip-version-check $(PLUGINS)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(XPK)
	touch $@

$(STAMP310): pyproject.toml plugins/tpu-registry-gce/pyproject.toml plugins/tpu-registry-vllm/pyproject.toml
	@PY310=$$(scripts/find_python.sh 3.10) && $$PY310 -m venv $(VENV310)
	$(VENV310)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	$(VENV310)/bin/pip install -q --disable-pip-version-check $(PLUGINS)
	$(VENV310)/bin/pip install -q --disable-pip-version-check --no-deps $(XPK)
	touch $@

run: $(STAMP)
	$(BIN)/tpu-registry list
	$(BIN)/tpu-registry detect
	$(BIN)/tpu-registry resolve --simulate v6e --hf-config examples/llama-3.1-8b.json --max-model-len 8192 --explain

test: test-core test-py310 test-integration

test-core: $(STAMP)
	$(BIN)/python -m pytest -q tests --ignore=tests/integration plugins/tpu-registry-gce/tests

test-py310: $(STAMP310)
	$(VENV310)/bin/python -m pytest -q -p no:cacheprovider tests --ignore=tests/integration plugins/tpu-registry-gce/tests -m "not needs_jax and not needs_matplotlib and not slow"

test-integration: $(STAMP)
	integration/run_tests.sh current
	integration/run_tests.sh legacy

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

fuzz: $(STAMP)
	TPU_REGISTRY_FUZZ_EXAMPLES=50000 $(BIN)/python -m pytest -q tests/test_fuzz.py

# Mutation testing of the rule-bearing modules ([tool.mutmut] in pyproject.toml; docs/mutation.md).
# Not part of `make test`. Always from scratch: results kept from an earlier run would not see
# tests added since. The subprocesses some tests start (the console script) import the mutated
# copy too, through PYTHONPATH (the folder must exist before Python starts for that to work).
# The fuzz tests run a fifth of their default examples against each mutant that reaches them.
# scripts/mutmut_run.py is mutmut's CLI with its process writing bytecode (each mutant's pytest
# then reads the test modules' assertion-rewritten .pyc cached in mutants/, which halves what a
# killed mutant costs) and detection mutants tested only by the tests that call detection
# themselves. The programs the tests start write no bytecode (PYTHONDONTWRITEBYTECODE=1), as in
# the suite's usual environment.
$(VENV)/.mutmut: $(STAMP) pyproject.toml
	$(BIN)/pip install -q --disable-pip-version-check -e '.[mutate]'
	touch $@

mutate: $(VENV)/.mutmut
	rm -rf mutants && mkdir mutants
	PYTHONPATH=$(CURDIR)/mutants TPU_REGISTRY_FUZZ_EXAMPLES=600 PYTHONDONTWRITEBYTECODE=1 \
		$(BIN)/python scripts/mutmut_run.py run --max-children 2 > mutants/run.log 2>&1 \
		|| { tail -n 40 mutants/run.log; exit 1; }
	@tail -n 3 mutants/run.log | tr '\r' '\n' | tail -n 3
	$(BIN)/python scripts/mutation_report.py

lint: $(STAMP)
	$(BIN)/ruff check tpu_registry tests benchmarks plugins scripts
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) $(VENV310) dist build .pytest_cache mutants
