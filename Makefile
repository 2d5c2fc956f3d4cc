# Two commands do all set-up on a fresh machine: `make demo` and `make test`. Both create and use .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SAMPLE := data/sample
DEMO_OUT := models/sample

.PHONY: setup demo spatial test lint format coco bench strip-notebooks clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: setup
	$(PY) prepare_data.py sample --root $(SAMPLE)
	$(PY) train.py --data sample --out-dir $(DEMO_OUT)
	$(PY) train.py --data sample --blind --out-dir $(DEMO_OUT)-blind
	$(PY) evaluate.py --data sample --split val --models $(DEMO_OUT) --baseline $(DEMO_OUT)-blind --examples 3

# The attention decoder against the pooled LSTM on the set whose captions say where things are (same epochs, seed).
spatial: setup
	$(PY) prepare_data.py sample --root data/sample-spatial --spatial
	$(PY) train.py --data sample-spatial --out-dir models/sample-spatial
	$(PY) train.py --data sample-spatial --decoder attention --out-dir models/sample-spatial-attention
	$(PY) evaluate.py --data sample-spatial --split val --models models/sample-spatial-attention \
		--baseline models/sample-spatial --examples 3

test: setup
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
