# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorablend-installed

.PHONY: test test-portable demo bench example fuzz venv clean

venv: $(STAMP)

# torch==2.13.0 first where that wheel exists (a CPU build on our machines), so that a plain
# `torch` requirement does not pull a multi-GB CUDA build; a torch that is already there is kept.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[test,serve,ray,quant]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The suite and the demo under other CPU kernel paths and one thread: a test that claims identical bits for
# floating-point results computed on other memory layouts fails here, not on a user's machine. Not run by CI
# (three suites); run it before claiming a result is portable.
PORTABLE_SETTINGS := ATEN_CPU_CAPABILITY=default ATEN_CPU_CAPABILITY=avx2 OMP_NUM_THREADS=1
test-portable: $(STAMP)
	@set -e; for setting in $(PORTABLE_SETTINGS); do \
		echo "== $$setting"; \
		env $$setting $(PY) -m lorablend demo --output demo-output-portable >/dev/null; \
		env $$setting $(PY) -m pytest -q -p no:cacheprovider; \
	done; rm -rf demo-output-portable

# Fuzz the header/format readers for MINUTES minutes (coverage-guided loop, then hypothesis): prints inputs tried
# and crashes, saves each crashing input in fuzz-crashes/, exits 1 on any crash.
MINUTES ?= 2
fuzz: $(STAMP)
	$(PY) tests/support/fuzz_readers.py --minutes $(MINUTES) --crashes fuzz-crashes

demo: $(STAMP)
	$(PY) -m lorablend demo --output demo-output

example: $(STAMP)
	$(PY) examples/merge_loras.py

bench: $(STAMP)
	$(PY) benchmarks/run_cpu.py

clean:
	rm -rf $(VENV) demo-output bench-output fuzz-crashes
