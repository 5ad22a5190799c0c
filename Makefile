# The README's two commands: `make quickstart` (install + shard -> train -> upscale bundled photos on a
# local S3/MLflow/Ray stack it starts and stops) and `make test`. `make demo` is the plain loop, no Ray.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.samsr-installed

.PHONY: install quickstart demo test test-fast test-quality test-nodeloss clean

install: $(STAMP)

# torch/torchvision are pinned by constraints.txt (the pair that imports together on our machines).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -c constraints.txt -e '.[test]'
	touch $(STAMP)

quickstart: install
	$(VENV)/bin/samsr quickstart --workdir samsr-quickstart $(QUICKSTART_ARGS)

demo: install
	$(VENV)/bin/samsr demo --out demo-output

# The whole suite (what CI runs), with the 25 slowest tests printed so their cost stays visible.
# pytest exits 5 when it collects no tests; that is not a failure of the suite.
test: install
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

# The edit loop: unit tests only, no servers and no training runs (under 3 minutes on 2 cores).
test-fast: install
	$(PY) -m pytest -q -m "not slow and not services and not quality" $(PYTEST_ARGS)

# Opt-in model-quality checks: the CPU recipes beat bicubic (minutes of training).
test-quality: install
	$(PY) -m pytest -q -m quality $(PYTEST_ARGS)

# Opt-in chaos tests: jobs on Ray's multi-node harness with a worker node killed mid-job (minutes).
test-nodeloss: install
	$(PY) -m pytest -q -m nodeloss $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo-output samsr-quickstart .samsr-local .pytest_cache
