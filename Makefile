# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA := data/shapes
RUN := runs/shapes

.PHONY: demo test clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) create_input_files.py --dataset shapes --output-folder $(DATA) --force

# pytest exits 5 when it collected nothing; make treats any non-zero exit as failure.
test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean:
	rm -rf $(DATA) $(RUN)
