# The three commands of the README: setup, test, dev. Everything else is a helper.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup test dev kubo clean bench

setup: $(BIN)/medicon-gateway kubo

$(BIN)/medicon-gateway: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python >= 3.11 is required")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

kubo:
	scripts/install-kubo.sh

test:
	$(BIN)/python -m pytest

dev:
	$(BIN)/medicon-gateway dev

# Benchmarks against direct Kubo and nginx (not part of `test`); BENCH_ARGS="--big" for 1 GiB.
bench: $(BIN)/medicon-gateway kubo
	bench/setup.sh
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .tools .medicon-dev
