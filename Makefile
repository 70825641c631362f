# The two commands of the README. Both set up .venv/ first (seconds once it exists).
PY := .venv/bin/python

.PHONY: setup demo test
setup:
	bash tools/bootstrap.sh

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest -q tests
