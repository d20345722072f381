# The two commands the README promises:
#   make demo   - set up and run the local end-to-end demo
#   make test   - set up and run the whole test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Parallel workers for the test suite; 2 cores on the reference machine.
PYTEST_WORKERS ?= 2

.PHONY: setup binaries node-prereqs lint test unit demo manifests images chart clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "dptr needs Python 3.11+"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Builds kube-apiserver & co. from upstream Go modules into ~/.cache/dptr
# (only when missing).
binaries: setup
	$(VENV)/bin/dptr-testbed build

# The real node (containerd, runc, CNI, podman, debootstrap from Debian's
# packages; kubelet and kube-proxy from the same Go modules) for tests/realnode.
node-prereqs: setup
	# Not fatal: without them tests/realnode fails and says what is missing.
	-$(VENV)/bin/dptr-testbed node-prereqs --install --build

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: setup binaries node-prereqs lint
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile

unit: setup
	$(VENV)/bin/pytest -m 'not cluster and not realnode'

demo: setup binaries
	$(VENV)/bin/dptr-testbed demo

# Regenerate manifests/ from the chart (a test fails when they drift).
manifests: binaries
	$(PY) scripts/generate-manifests.py

# The operator, sidecar and activity images, built with podman on the test bed's local
# Debian base (as root: debootstrap), tagged ghcr.io/dptr-dev/dptr-<target>:<version>,
# with the OCI labels release.yml sets. Pushes nothing (docs/releasing.md).
images: setup
	$(VENV)/bin/dptr-testbed images --release

# charts/dptr, linted and packaged by the bed's helm into dist/dptr-<version>.tgz.
chart: binaries
	$(VENV)/bin/dptr-testbed chart --destination dist

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache dist
