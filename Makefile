# Two entry points for a fresh machine: `make demo` and `make test`.
# The venv sees system site-packages so that an already installed torch (e.g. a CUDA build) is kept;
# without any torch, torch==2.13.0 is installed first (the CPU wheel where pip's index offers one), so
# that nothing else pulls an unpinned torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo

.PHONY: install demo test compat clean

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

# The oldest transformers nativevl supports (pyproject: >= 4.52), in a venv of its own: the test files
# whose oracle or run-time code is transformers (tokenizers, chat templates, the processor, InternVL
# classes, PEFT on them). Reinstalled when pyproject, this file or COMPAT_TRANSFORMERS change.
COMPAT_TRANSFORMERS ?= 4.52.4
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_TESTS := tests/test_parity.py tests/test_checkpoint.py tests/test_model.py tests/test_generate.py \
	tests/test_data.py tests/test_pipeline.py tests/test_config.py tests/test_engine.py tests/test_server.py \
	tests/test_adapter.py tests/test_cli.py tests/test_train.py tests/test_review_images.py tests/test_prefix_cache.py
COMPAT_STAMP := $(COMPAT_VENV)/.installed-transformers-$(COMPAT_TRANSFORMERS)

$(COMPAT_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv --system-site-packages $(COMPAT_VENV)
	$(COMPAT_PY) -c "import torch" 2>/dev/null || $(COMPAT_PY) -m pip install "torch==2.13.0"
	$(COMPAT_PY) -c "import torch; print('torch==' + torch.__version__)" > $(COMPAT_VENV)/constraints.txt
	$(COMPAT_PY) -m pip install -c $(COMPAT_VENV)/constraints.txt -e ".[serve,data]" "transformers==$(COMPAT_TRANSFORMERS)" \
		"pytest>=8" "peft>=0.15" "openai>=1.40" "httpx>=0.27"
	rm -f $(COMPAT_VENV)/.installed-transformers-*
	touch $@

compat: $(COMPAT_STAMP)
	$(COMPAT_PY) -c "import transformers; print('transformers', transformers.__version__)"
	$(COMPAT_PY) -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/nativevl demo --out $(OUT)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(COMPAT_VENV) runs
