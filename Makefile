# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[runner,operator,test]'
	touch $(STAMP)

.PHONY: setup demo test tools
setup: $(STAMP)

# External tools the tests drive (helm, prometheus, promtool, lua5.4), installed once and cached
# under $${XDG_CACHE_HOME:-~/.cache}/consensusfit; best effort: tests needing a missing tool skip.
tools:
	scripts/tools.sh install

demo: $(STAMP)
	$(BIN)/consensusfit demo

# The end-to-end tests' control plane: etcd, Kubernetes and kwok built with Go (scripts/cluster.py),
# cached under ~/.cache/consensusfit/bin (seconds once built). Without Go those tests are skipped.
.PHONY: cluster-tools
cluster-tools: tools
	@if command -v go >/dev/null 2>&1; then $(PYTHON) scripts/cluster.py build; \
	else echo "go not found: the end-to-end tests (tests/e2e) will be skipped"; fi

# The container images (scripts/images.py): a base made from Debian packages (mmdebstrap), then the
# CPU runner and the operator from their Dockerfiles, each skipped when the image tagged with the
# hash of its sources exists. As root with apt-get it installs podman, runc and mmdebstrap first;
# without them it says so and the image tests skip. `images-cuda` adds the CUDA runner (gigabytes
# of CUDA wheels; not part of `make test`).
.PHONY: images images-cuda
images:
	$(PYTHON) scripts/images.py build

images-cuda:
	$(PYTHON) scripts/images.py cuda

test: $(STAMP) tools cluster-tools images
	$(BIN)/python -m pytest -q
