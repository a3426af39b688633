# Two entry points for a fresh machine: `make demo` and `make test`.
# The venv sees system site-packages so that an already installed torch (e.g. a CUDA build) is kept;
# without any torch, torch==2.13.0 is installed first (the CPU wheel where pip's index offers one), so
# that nothing else pulls an unpinned torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo

.PHONY: install demo test clean

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

# Every later install is constrained to the torch in place (pinned in $(VENV)/constraints.txt): no
# dependency can swap it for another build.
$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(PY) -m pip install -c $(VENV)/constraints.txt -e ".[serve,data]"
	touch $@

# The quantization tests' oracle, compressed-tensors (>= 0.16 needs torch >= 2.10), is installed where the
# torch in place is recent enough; the tests that need it skip otherwise.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -c $(VENV)/constraints.txt -e ".[test]"
	if $(PY) -c "import sys, torch; sys.exit(tuple(map(int, torch.__version__.split('.')[:2])) < (2, 10))"; then \
		$(PY) -m pip install -c $(VENV)/constraints.txt "compressed-tensors>=0.16"; \
	else echo "torch < 2.10: the compressed-tensors tests will be skipped"; fi
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/nativevl demo --out $(OUT)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
