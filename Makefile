# glm5: two commands. `make demo` runs the main job, `make test` the whole suite.
# Both create .venv with the Python they find (3.11+) and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exactly: the CPU wheel of 2.13 (a looser spec pulls a CUDA build)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m glm5.cli demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check glm5 tests bench

bench: $(STAMP)
	$(PY) bench/forward.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
