# The three commands of the README: setup, test, dev. Everything else is a helper.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

JS_DIR := tests/js
# The plugin author's example: pip-installed (not editable: as an institution installs it), then
# its own tests run against the gateway it is loaded into.
EXAMPLE       := examples/medicon-example-plugin
EXAMPLE_STAMP := $(VENV)/.medicon-example-plugin-installed
EXAMPLE_FILES := $(shell find $(EXAMPLE) -type f \( -name '*.py' -o -name '*.json' -o -name '*.toml' \) -not -path '*/build/*')

.PHONY: setup test test-sqlite test-postgres dev kubo system-deps clean bench bench-keys bench-fhir chaos

# System packages first (PostgreSQL, Chromium, chromedriver; needs root when one is missing).
setup: system-deps $(BIN)/medicon-gateway kubo $(JS_DIR)/node_modules/.medicon-installed $(EXAMPLE_STAMP)

system-deps:
	scripts/install-system-deps.sh

$(BIN)/medicon-gateway: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python >= 3.11 is required")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

kubo:
	scripts/install-kubo.sh

# The JS clients the tests drive (kubo-rpc-client), exactly as package-lock.json pins them.
$(JS_DIR)/node_modules/.medicon-installed: $(JS_DIR)/package.json $(JS_DIR)/package-lock.json
	npm ci --prefix $(JS_DIR) --no-audit --no-fund
	touch $@

$(EXAMPLE_STAMP): $(BIN)/medicon-gateway $(EXAMPLE_FILES)
	$(BIN)/python -m pip install --quiet './$(EXAMPLE)[test]'
	touch $@

# The whole suite twice: on the embedded SQLite stores, then with every gateway it starts on a
# real PostgreSQL server (a throwaway cluster the fixtures start; Debian's postgresql); then the
# example plugin's own tests.
test: test-sqlite test-postgres test-example

test-sqlite: $(EXAMPLE_STAMP)
	MEDICON_TEST_STORAGE=sqlite $(BIN)/python -m pytest

test-postgres: $(EXAMPLE_STAMP)
	MEDICON_TEST_STORAGE=postgres $(BIN)/python -m pytest

test-example: $(EXAMPLE_STAMP)
	cd $(EXAMPLE) && $(abspath $(BIN))/python -m pytest

dev:
	$(BIN)/medicon-gateway dev

# Benchmarks against direct Kubo and nginx (not part of `test`); BENCH_ARGS="--big" for 1 GiB.
bench: $(BIN)/medicon-gateway kubo
	bench/setup.sh
	$(BIN)/python -m bench $(BENCH_ARGS)

# The cost of a new patient at 10^3, 10^5 and 10^6 patients, SQLite and PostgreSQL (not part of
# `test`; KEYS_ARGS="--sizes 1000,100000" for a shorter run).
bench-keys: $(BIN)/medicon-gateway
	$(BIN)/python -m bench.keys_scale --rotate $(KEYS_ARGS)

# Synthetic longitudinal FHIR patients written into a gateway of its own and read back through
# the FHIR facade, byte for byte (not part of `test`; FHIR_ARGS="--patients 8" for more).
bench-fhir: $(BIN)/medicon-gateway kubo
	$(BIN)/python -m bench.fhir_replay --out bench/results/fhir_replay.json $(FHIR_ARGS)

# The long variants of the fault, race and fuzz tests (not part of `test`): CHAOS_SCALE multiplies
# the SIGKILL rounds and the concurrent writers, CHAOS_EXAMPLES is the fuzz examples per test
# (fresh random ones). Ends with the summary line; fails if a test fails or the summary does not
# read "lost 0, forks 0, 5xx 0" (507s answered while a disk is full are counted apart). The whole
# log is kept in $(CHAOS_LOG).
CHAOS_SCALE    ?= 20
CHAOS_EXAMPLES ?= 4000
CHAOS_LOG      := .medicon-chaos.log
CHAOS_TESTS    := tests/test_reliability.py tests/test_faults.py tests/test_durability.py tests/test_hostile_input.py \
                  tests/test_openapi_fuzz.py

chaos:
	( MEDICON_CHAOS=$(CHAOS_SCALE) MEDICON_FUZZ_EXAMPLES=$(CHAOS_EXAMPLES) \
	  $(BIN)/python -m pytest -p no:cacheprovider $(CHAOS_TESTS); echo "pytest exit status $$?" ) 2>&1 | tee $(CHAOS_LOG)
	@grep '^chaos: ' $(CHAOS_LOG) || echo 'chaos: no summary'
	@grep -q '^pytest exit status 0$$' $(CHAOS_LOG) && \
	 grep -q '^chaos: acknowledged [1-9][0-9]*, .*, lost 0, forks 0, 5xx 0$$' $(CHAOS_LOG)

clean:
	rm -rf $(VENV) .tools .medicon-dev $(CHAOS_LOG) $(JS_DIR)/node_modules $(EXAMPLE)/build
