"""serving/engine.py without HTTP: requests in one batch sample with their own options and
get the tokens lowbit.generate gives each alone; long prompts are prefilled a chunk a step while
others decode. Float64 tiny models: random weights give near-flat distributions, where float32
rounding differences between batched and single forwards could flip near-ties."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.checkpoint import load_tokenizer
from lowbit.runtime.generate import options
from lowbit.runtime.load import load_model
from lowbit.serving.engine import Engine
from serving import wait_for

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    path = tiny_dir("llama")
    model, tok = load_model(path, torch.float64), load_tokenizer(path)
    engine = Engine(model, tok, max_batch=4, max_len=256)
    yield engine, model, tok
    engine.close()


def test_each_request_in_a_batch_samples_with_its_own_options(tiny):
    engine, model, tok = tiny
    kinds = [dict(max_tokens=20), dict(max_tokens=20, temperature=1.0, top_k=20, seed=3),
             dict(max_tokens=12, temperature=0.7, top_p=0.9, seed=5), dict(max_tokens=20, temperature=1.5, seed=3)]
    prompts = [PROMPT, "hello", [{"role": "user", "content": "hi"}], PROMPT]
    reqs = [engine.submit(engine.encode(p), options(**k, ignore_eos=True)) for p, k in zip(prompts, kinds)]
    assert wait_for(lambda: all(r.state == "done" for r in reqs))
    assert max(r.admitted_step for r in reqs) < min(r.finished_step for r in reqs)  # one batch
    for p, k, r in zip(prompts, kinds, reqs):
        alone = lowbit.generate(model, p, tokenizer=tok, ignore_eos=True, **k)
        assert r.token_ids == alone.token_ids and r.text.text == alone.text


def test_long_prompts_prefill_in_chunks_between_decode_steps(tiny):
    _, model, tok = tiny
    engine = Engine(model, tok, max_batch=3, max_len=128, prefill_chunk=4)  # many chunks per prompt
    try:
        prompts = [PROMPT * 2, "hi", PROMPT]
        first = engine.submit(engine.encode(prompts[1]), options(24, ignore_eos=True))
        assert wait_for(lambda: len(first.token_ids) > 0)  # decoding while the others prefill
        reqs = [first] + [engine.submit(engine.encode(p), options(8, ignore_eos=True)) for p in prompts[::2]]
        assert engine.drain(30)
        long = reqs[1]  # one 4-token chunk a step (its last one gives the first token), then 7 decodes
        assert long.finished_step - long.admitted_step == -(-len(long.ids) // 4) - 1 + 7
        for p, r in zip([prompts[1], prompts[0], prompts[2]], reqs):
            alone = lowbit.generate(model, p, max_tokens=len(r.token_ids), tokenizer=tok, ignore_eos=True)
            assert r.token_ids == alone.token_ids
    finally:
        engine.close()
