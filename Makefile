# Two entry points for a fresh machine (see README):
#   make demo   set up, then run the main job on the shipped default
#   make test   set up, then run the whole test suite (napari tests under a virtual X server)
# Both are idempotent: a re-run skips what is already installed.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup system-deps demo test clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[napari,test]'
	touch $(STAMP)

system-deps:
	scripts/system-deps.sh

setup: system-deps $(STAMP)

demo: setup
	$(BIN)/nucsynth demo --out demo_out

test: setup
	QT_API=pyqt6 $(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
