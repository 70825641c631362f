# The two commands of the README. Both set up .venv/ first (seconds once it exists).
PY := .venv/bin/python

.PHONY: setup demo test
setup:
	bash tools/bootstrap.sh

demo: setup
	$(PY) tools/demo.py

# Two worker processes (pytest-xdist, one torch thread each; a test file stays on one
# worker, so its module fixtures are built once) keep both cores of a small machine busy.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile tests
