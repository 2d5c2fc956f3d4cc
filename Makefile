# Two commands do all set-up on a fresh machine: `make demo` and `make test`. Both create and use .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SAMPLE := data/sample
DEMO_OUT := models/sample

.PHONY: setup demo test lint format coco bench strip-notebooks clean

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
