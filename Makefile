# Two entry points, both self-contained on a fresh machine:
#   make test   create .venv if missing, install tfgalflow[test], run the fast test suite
#   make demo   same install, then run the main job on a small built-in Hernquist mock
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_output

.PHONY: test test-slow lint demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall whenever the package metadata changes.
$(STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Lint first (ruff, configured in pyproject.toml); then pytest. pytest exits 5 when it collected no
# tests: that is a broken suite, not a pass.
lint: $(STAMP)
	$(PY) -m ruff check .

# The fast suite runs on TEST_WORKERS processes (pytest-xdist), a test file per worker at a time so
# module fixtures are built once (XLA compilation and Python are largely single-threaded, so two
# workers gain on two cores; README has the times). TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2

test: lint
	@$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests -- failing"; exit 1; fi; \
	exit $$rc

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

demo: $(STAMP)
	$(VENV)/bin/tfgalflow demo --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) $(DEMO_OUT) build *.egg-info
