"""Run llm-compressor on one scheme (executed with the llm-compressor venv's python).

    python _llmc_run.py MODEL OUT SCHEME TOKENS.json GROUP_SIZE
TOKENS.json holds the calibration samples as lists of token ids: the same ones lowbit uses.
"""

import json
import sys

import torch
from compressed_tensors.quantization import QuantizationArgs
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.transform import SmoothQuantModifier
from transformers import AutoModelForCausalLM

model_dir, out, scheme, tokens_file, group = sys.argv[1:6]
tokens = json.loads(open(tokens_file).read())
ds = Dataset.from_dict({"input_ids": tokens, "attention_mask": [[1] * len(t) for t in tokens]})
int4 = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                        "strategy": "group", "group_size": int(group)}}}
kv = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
common = dict(targets="Linear", ignore=["lm_head"])
recipe = {
    "W4A16": [GPTQModifier(config_groups=int4, ignore=["lm_head"])],
    "W4A16_RTN": [QuantizationModifier(config_groups=int4, ignore=["lm_head"])],
    "W8A8_INT8": [SmoothQuantModifier(smoothing_strength=0.8), GPTQModifier(scheme="W8A8", **common)],
    "FP8": [QuantizationModifier(scheme="FP8", **common)],
    "FP8_KV": [QuantizationModifier(scheme="FP8", kv_cache_scheme=kv, **common)],
    "NVFP4": [GPTQModifier(scheme="NVFP4", **common)],
    "NVFP4A16": [GPTQModifier(scheme="NVFP4A16", **common)],
}[scheme]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(tokens),
        max_seq_length=max(len(t) for t in tokens), shuffle_calibration_samples=False)
model.save_pretrained(out, save_compressed=True)
from transformers import AutoTokenizer  # noqa: E402

AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
