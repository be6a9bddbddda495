"""runtime/batch.py: one decode forward for requests at different positions gives each request
the logits transformers computes for it alone.

Compared in float64 against the full forward of each sequence by itself (no cache): the two
compute the same sums in different orders and shapes (SDPA on a gathered cache against
transformers' own masked attention), so they agree to float64 rounding, ~1e-16 relative on
logits of size ~1; 1e-12 leaves room for accumulation over 2 layers and nothing else: a wrong
position, mask, slot or rotation moves logits by 1e-2 or more.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lowbit.attention import attention_modules, kv_hooks
from lowbit.errors import LowbitError
from lowbit.runtime.batch import BatchDecoder
from tiny import tiny_config, tiny_model

TOL = 1e-12
LENGTHS = (5, 40, 17)  # prompts of three requests, so they decode at positions 4, 39 and 16


def _sequences(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in LENGTHS]


def _alone(model, seqs) -> torch.Tensor:
    return torch.stack([model(torch.tensor([ids])).logits[0, -1] for ids in seqs])


def _batched(model, seqs, slots=(2, 0, 3)) -> torch.Tensor:
    decoder = BatchDecoder(model, slots=4, max_len=64)
    for slot, ids in zip(slots, seqs):
        decoder.prefill(slot, ids[:-1], chunk=8)  # several chunks for the longer prompts
    return decoder.decode(list(slots), [ids[-1] for ids in seqs], [len(ids) - 1 for ids in seqs])


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"])
def test_decode_at_mixed_positions_equals_each_request_alone(family):
    model = tiny_model(family, dtype=torch.float64)
    seqs = _sequences()
    ours, theirs = _batched(model, seqs), _alone(model, seqs)
    assert ours.dtype == torch.float64
    # transformers' eager Gemma 2 attention (soft-capped, so not SDPA) takes its softmax in
    # float32 even in a float64 model: its answer is float32-exact only, ~1e-8 here
    assert (ours - theirs).abs().max() < (1e-6 if family == "gemma2" else TOL)


def test_gemma_1_decodes_at_mixed_positions_as_alone():
    config = AutoConfig.for_model("gemma", **{k: getattr(tiny_config("llama"), k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
    seqs = _sequences()
    assert (_batched(model, seqs) - _alone(model, seqs)).abs().max() < TOL


def test_a_slot_reused_after_a_longer_request_ignores_what_it_left():
    model = tiny_model("llama", dtype=torch.float64)
    decoder = BatchDecoder(model, slots=2, max_len=64)
    long, short = _sequences(1)[1], _sequences(2)[0]
    decoder.prefill(0, long)  # positions 0..39 of slot 0 now hold another request's keys
    decoder.prefill(0, short[:-1])
    ours = decoder.decode([0], [short[-1]], [len(short) - 1])
    assert (ours - _alone(model, [short])).abs().max() < TOL


def test_sliding_window_layers_see_only_their_window():
    config = tiny_config("mistral")
    config.sliding_window = 8  # shorter than two of the three sequences
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
    seqs = _sequences()
    ours, theirs = _batched(model, seqs), _alone(model, seqs)
    assert (ours - theirs).abs().max() < TOL
    config.sliding_window = None  # the window changes the answer: the comparison can fail
    assert (_batched(model, seqs) - theirs).abs().max() > 1e-4


def test_the_kv_hook_is_applied_to_what_is_cached():
    model = tiny_model("qwen3", dtype=torch.float64)
    coarse = lambda m, k, v: ((k * 4).round() / 4, (v * 4).round() / 4)  # idempotent, like FP8 qdq
    seqs = _sequences()
    plain = _alone(model, seqs)
    with kv_hooks({m: coarse for m in attention_modules(model).values()}):
        theirs = _alone(model, seqs)
        ours = _batched(model, seqs)
    assert (theirs - plain).abs().max() > 1e-3  # the hook matters
    assert (ours - theirs).abs().max() < TOL


def test_other_families_are_refused_by_name():
    config = tiny_config("llama")
    config.model_type = "olmo"  # any family without a path here
    with pytest.raises(LowbitError, match="'olmo'.*--engine vllm"):
        BatchDecoder(AutoModelForCausalLM.from_config(tiny_config("llama")).eval().__class__(config),
                     slots=1, max_len=16)


def test_positions_past_the_cache_are_refused():
    decoder = BatchDecoder(tiny_model("llama"), slots=1, max_len=8)
    with pytest.raises(LowbitError, match="beyond the cache"):
        decoder.decode([0], [5], [8])


def test_prompts_of_different_lengths_prefill_in_one_forward():
    model = tiny_model("qwen2", dtype=torch.float64)
    decoder = BatchDecoder(model, slots=2, max_len=41)
    long, short = _sequences(3)[1], _sequences(4)[2]  # 40 and 17 tokens
    decoder.prefill(0, long[:36])
    # the long request's 3 tokens are padded to the short one's 16: its padding runs past the
    # cache's end (positions 39..51 of 41) and is parked on the last position
    decoder.prefill_many([0, 1], [long[36:39], short[:16]], [36, 0])
    ours = decoder.decode([0, 1], [long[39], short[16]], [39, 16])
    assert (ours - _alone(model, [long, short])).abs().max() < TOL


def test_a_quantized_checkpoint_with_an_fp8_kv_cache_decodes_as_it_runs_alone(tiny_dir, tmp_path):
    # packed INT4 Linears and the simulated FP8 cache, as lowbit.load runs them; float32, so the
    # bound is float32 rounding of logits of size ~1 over 2 layers (seen: ~1e-6), far below the
    # 1e-2 an unapplied FP8 cache or a wrong position moves them
    import lowbit
    from lowbit.runtime.load import load_model

    data = tmp_path / "calib.txt"
    data.write_text("\n\n".join(f"record {i}: " + "the quick brown fox jumps " * (i % 5 + 2) for i in range(40)))
    out = tmp_path / "w4-kv"
    lowbit.quantize(tiny_dir("qwen3"), out, "W4A16", dataset=str(data), samples=4, seq_len=32,
                    group_size=32, kv_cache="fp8", algorithm="rtn")
    model = load_model(out, torch.float32, packed=True)
    assert any(type(m).__name__ == "Int4Linear" for m in model.modules())
    assert all("_lowbit_kv_hook" in layer.self_attn.__dict__ for layer in model.model.layers)
    seqs = _sequences()
    assert (_batched(model, seqs) - _alone(model, seqs)).abs().max() < 1e-4


def test_gemma2_soft_caps_attention_scores():
    model = tiny_model("gemma2", dtype=torch.float64)
    with torch.no_grad():  # random weights give scores ~0.1, where tanh is linear: make them large
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 20
            layer.self_attn.k_proj.weight *= 20
    seqs = _sequences()
    theirs = _alone(model, seqs)
    assert (_batched(model, seqs) - theirs).abs().max() < 1e-6  # float32 softmax in transformers
    for layer in model.model.layers:  # the cap changes the answer: the comparison can fail
        layer.self_attn.attn_logit_softcapping = None
    model.config.attn_logit_softcapping = None
    assert (_batched(model, seqs) - theirs).abs().max() > 1e-3


def test_a_cache_too_big_to_allocate_says_what_to_lower():
    # 2^34 slots: 2 PiB (keys and values, 2 layers, float32), beyond any x86-64 address space,
    # so the allocation fails at once
    with pytest.raises(LowbitError, match="KV cache for 17179869184 requests of 256 positions needs "
                       r"2097152\.0 GiB.*--max-batch"):
        BatchDecoder(tiny_model("llama"), slots=2**34, max_len=256)


# ------------------------------------------------------------------ generate_batch (quality.complete)

PROMPTS = ["the quick brown fox", "a", "hello world, a longer prompt than the others " * 3, "xyz",
           "one two", "abc def ghi", "the lazy dog"]


def _each_alone(model, tok, prompts, **kw):
    import lowbit

    return [lowbit.generate(model, p, tokenizer=tok, **kw) for p in prompts]


def _same(got, want) -> bool:
    return [(g.token_ids, g.text, g.finish_reason) for g in got] == \
        [(w.token_ids, w.text, w.finish_reason) for w in want]


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma2", "gemma3_text"])
def test_generate_batch_gives_generates_tokens_with_slots_reused(family):
    from lowbit.runtime.batch import generate_batch
    from tiny import tiny_tokenizer

    model, tok = tiny_model(family, dtype=torch.float64), tiny_tokenizer()
    # 7 prompts through 3 slots: four are admitted into slots freed by finished requests
    got = generate_batch(model, tok, PROMPTS, max_tokens=12, batch=3)
    assert _same(got, _each_alone(model, tok, PROMPTS, max_tokens=12))
    assert {g.finish_reason for g in got} >= {"length"}


def test_generate_batch_ends_at_stop_strings_eos_and_one_token_as_generate():
    from lowbit.runtime.batch import generate_batch
    from tiny import tiny_tokenizer

    model, tok = tiny_model("llama", dtype=torch.float64), tiny_tokenizer()
    plain = _each_alone(model, tok, PROMPTS, max_tokens=16)
    assert {"eos", "length"} <= {g.finish_reason for g in plain}  # both endings happen here
    stop = next(g.text[3:5] for g in plain if len(g.text) > 6)  # a stop string one answer meets
    for kw in ({"max_tokens": 16, "stop": [stop]}, {"max_tokens": 1}):
        got = generate_batch(model, tok, PROMPTS, batch=2, **kw)
        want = _each_alone(model, tok, PROMPTS, **kw)
        assert _same(got, want), kw
    assert "stop" in {g.finish_reason for g in generate_batch(model, tok, PROMPTS, batch=2, max_tokens=16,
                                                              stop=[stop])}


@pytest.mark.e2e
def test_smollm2_float32_batched_chat_answers_are_generates(smollm2_dir):
    # float32: a batched row and a batch-1 row round differently by ~1e-6, far from SmolLM2's
    # greedy margins on these prompts; in bf16 (~1e-2) a near-tie can flip, so bf16 is not compared
    from lowbit.runtime.batch import generate_batch
    from lowbit.runtime.generate import model_and_tokenizer

    model, tok = model_and_tokenizer(smollm2_dir, None, torch.float32)
    prompts = [[{"role": "user", "content": c}] for c in (
        "What is the capital of France?", "Write a haiku about the sea.",
        "Explain in two sentences why the sky is blue, as you would to a child who keeps asking why.",
        "List three prime numbers.", "Say hello.")]
    got = generate_batch(model, tok, prompts, max_tokens=24, batch=3)
    assert _same(got, _each_alone(model, tok, prompts, max_tokens=24))
