# The two commands of the README. Both set up .venv/ first (seconds once it exists).
PY := .venv/bin/python

.PHONY: setup demo test test-isa
setup:
	bash tools/bootstrap.sh

demo: setup
	$(PY) tools/demo.py

# Two worker processes (pytest-xdist, one torch thread each; a test file stays on one
# worker, so its module fixtures are built once) keep both cores of a small machine busy.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The tests whose numbers depend on the CPU's arithmetic, run as another CPU class and
# other thread counts would run them, on this machine: first with oneDNN and ATen held
# to ISA (AVX2 by default; e.g. ISA=AVX512_CORE) and the Winograd op's 8-float path,
# then with the test processes at two threads and every process they start at one.
ISA ?= AVX2
NUMERIC_TESTS := tests/test_numerics.py tests/test_repvgg.py tests/test_gemm_conv.py \
	tests/test_winograd.py tests/test_speed.py tests/test_aoti.py tests/test_deploy.py \
	tests/test_checkpoint_kinds.py tests/test_hook.py tests/test_quantize.py \
	tests/test_recommend.py
test-isa: setup
	status=0; \
	DNNL_MAX_CPU_ISA=$(ISA) ONEDNN_MAX_CPU_ISA=$(ISA) \
	ATEN_CPU_CAPABILITY=$(shell echo $(ISA) | tr A-Z a-z | sed 's/_.*//') \
	MMREPVGG_WINOGRAD_VECTOR_WIDTH=8 \
	$(PY) -m pytest -q -n 2 --dist loadfile $(NUMERIC_TESTS) || status=1; \
	MMREPVGG_TEST_THREADS=2 OMP_NUM_THREADS=1 \
	$(PY) -m pytest -q -n 2 --dist loadfile $(NUMERIC_TESTS) || status=1; \
	exit $$status
