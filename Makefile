# Two commands: `make demo` and `make test`. Both create .venv on first use and are idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed
# pytest-xdist workers for `make test` / `make test-fast` (2 = both cores of the CI box; TEST_WORKERS=0 runs serially)
TEST_WORKERS ?= 2

.PHONY: venv test test-fast demo bench clean

venv: $(STAMP)

# torch is pinned in the same pip command as the HF stack so pip never swaps in a CUDA build.
$(STAMP): requirements.txt requirements-test.txt pyproject.toml setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=$(CURDIR)/.cache/hf \
	  $(PY) -m pytest -q -n $(TEST_WORKERS) --durations=20 tests

# The developer loop: everything except the tests marked `slow` (subprocess and multi-process runs).
test-fast: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=$(CURDIR)/.cache/hf \
	  $(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" tests

demo: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=$(CURDIR)/.cache/hf \
	  $(PY) examples/train_text.py --demo

# Not part of CI: the quick quality benchmark (one seed, ~10-15 min on 2 cores) and the overhead benchmark (CPU clock).
# quality.py writes runs/quality-quick/ and its generated block in docs/benchmarks.md; overhead.py prints JSON.
bench: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=$(CURDIR)/.cache/hf \
	  $(PY) benchmarks/quality.py --quick --jobs 2 --threads 1
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=$(CURDIR)/.cache/hf \
	  $(PY) benchmarks/overhead.py --threads 1 --clock cpu

clean:
	rm -rf $(VENV) .cache build *.egg-info
