# Two commands do all set-up on a fresh machine: `make demo` and `make test`. Both create and use .venv.
# `make serve` starts the web demo (app.py) on the sample model, training it first when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SAMPLE := data/sample
DEMO_OUT := models/sample

.PHONY: setup sample-model demo serve spatial browser test lint format coco bench strip-notebooks clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

sample-model: setup
	$(PY) prepare_data.py sample --root $(SAMPLE)
	$(PY) train.py --data sample --out-dir $(DEMO_OUT)

demo: sample-model
	$(PY) train.py --data sample --blind --out-dir $(DEMO_OUT)-blind
	$(PY) evaluate.py --data sample --split val --models $(DEMO_OUT) --baseline $(DEMO_OUT)-blind --examples 3

# The attention decoder against the pooled LSTM on the set whose captions say where things are (same epochs, seed).
spatial: setup
	$(PY) prepare_data.py sample --root data/sample-spatial --spatial
	$(PY) train.py --data sample-spatial --out-dir models/sample-spatial
	$(PY) train.py --data sample-spatial --decoder attention --out-dir models/sample-spatial-attention
	$(PY) evaluate.py --data sample-spatial --split val --models models/sample-spatial-attention \
		--baseline models/sample-spatial --examples 3

# The web demo on http://127.0.0.1:7860 (Ctrl-C stops it); the sample model is trained only when it has no weights.
serve: setup $(if $(wildcard $(DEMO_OUT)/encoder-*.pkl),,sample-model)
	$(PY) app.py --models $(DEMO_OUT)

# Debian's chromium and chromium-driver for the browser tests (tests/test_app.py): installed when missing, where
# apt-get is there and we are root. Never fails: without them the browser tests skip, or fail under CI=true.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's chromium and chromium-driver for the browser tests"; \
		(export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && \
		 apt-get install -y -qq chromium chromium-driver >/dev/null) || \
		echo "warning: apt-get could not install chromium and chromium-driver: the browser tests cannot run"; \
	else echo "note: no /usr/bin/chromium or /usr/bin/chromedriver (as root: make browser), the browser tests skip"; fi

test: setup browser
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .

format: setup
	$(PY) -m ruff check --fix .

coco: setup
	$(PY) prepare_data.py coco --root data/coco

bench: setup
	$(PY) bench.py --json bench.json

strip-notebooks: setup
	$(VENV)/bin/jupyter nbconvert --clear-output --inplace *.ipynb

clean:
	rm -rf .cache .pytest_cache .ruff_cache
