# The two commands of the README: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_STATE ?= .demo
MOUNTPOINT ?= lake

.PHONY: demo down test lint unit bench soak sysdeps venv clean sidecar sidecar-test

sysdeps:
	@scripts/install-system-packages.sh

$(BIN)/.installed: pyproject.toml | sysdeps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip wheel 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/pip install -q --disable-pip-version-check -e '.[fuse,test,dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import pyfuse3, trio, rucio.client, aiohttp"
	touch $@

venv: $(BIN)/.installed

demo: sysdeps venv
	$(BIN)/datalakefs demo up --state-dir $(DEMO_STATE)
	$(BIN)/datalakefs demo mount --state-dir $(DEMO_STATE) $(MOUNTPOINT)
	@$(BIN)/datalakefs demo tour --state-dir $(DEMO_STATE) $(MOUNTPOINT)

down: venv
	-$(BIN)/datalakefs umount $(MOUNTPOINT)
	$(BIN)/datalakefs demo down --state-dir $(DEMO_STATE)

lint: venv
	$(BIN)/ruff check datalakefs tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: venv
	$(BIN)/pytest -q tests/unit tests/model

test: sysdeps venv lint
	$(BIN)/pytest

bench: sysdeps venv
	$(BIN)/pip install -q --disable-pip-version-check -e '.[bench]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m bench

soak: sysdeps venv
	DATALAKEFS_SOAK=1 $(BIN)/pytest -q tests/integration/test_outbox_crash.py

# the sidecar image, built with buildah from a debootstrap base (no registry); not part of `make test`
sidecar: venv
	scripts/build-sidecar.sh

# starts the image through its entrypoint against the test lake (slow: builds the image first)
sidecar-test: sidecar
	DATALAKEFS_SIDECAR=1 $(BIN)/pytest -q tests/sidecar

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
