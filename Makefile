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

$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/nativevl demo --out $(OUT)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
