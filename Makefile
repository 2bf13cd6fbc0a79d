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

test: $(STAMP) tools
	$(BIN)/python -m pytest -q
