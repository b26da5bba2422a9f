# Every target creates .venv itself and installs with the constraints file, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check -c requirements/constraints.txt
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
OUT ?= runs/quickstart
JOBS ?= 2

.PHONY: setup data browser quickstart test test-fast lint bench bench-gpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt requirements/dev.txt requirements/nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -r requirements/dev.txt
	$(PIP) --no-deps -r requirements/nodeps.txt
	$(PIP) --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist; install it when missing and we are root.
data:
	@if [ -f "$(FMNIST)" ] || [ -n "$$ROBUSTKD_DATA" ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'" \
		     "or set ROBUSTKD_DATA to a folder holding the four *-ubyte.gz files." >&2; exit 1; \
	fi

# Headless Chromium for the report's browser test (Debian's chromium); install it when missing and we are root.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null; \
	else \
		echo "chromium is missing (the report's browser test is skipped without it): run" \
		     "'sudo apt-get install chromium'." >&2; \
	fi

quickstart: setup data
	$(VENV)/bin/robustkd quickstart --out $(OUT)

lint: setup
	$(VENV)/bin/ruff check robustkd tests benchmarks
	$(VENV)/bin/ruff format --check robustkd tests benchmarks

# Both parts spread over both cores, one thread a worker. The end-to-end tests go by file (--dist loadfile),
# so a file's shared fixtures (a trained teacher) are built once; two files at once with one thread each
# finish sooner than one at a time with two threads (8 min against 10 here).
test: setup data browser lint
	$(PY) -m pytest -q -n $(JOBS) -m "not slow"
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile -m slow --durations=10

test-fast: setup data
	$(PY) -m pytest -q -n $(JOBS) -m "not slow"

bench: setup data
	$(PY) -m benchmarks.run

# On a machine with one CUDA device: the CUDA tests, then AdvFunMatch epoch time on CIFAR-10 shapes, eager
# against the graph-captured attack, bf16 and channels-last on and off; one JSON object (sized for 8 min on an H100).
bench-gpu: setup
	$(PY) -m benchmarks.gpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
