"""lowbit.generate / lowbit.stream / `lowbit generate`: greedy equals transformers' own greedy
generate, sampling is reproducible and stays inside top-k / top-p, stop strings and max_tokens
end a completion, bad arguments are LowbitErrors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.checkpoint import load_tokenizer
from lowbit.runtime import generate as gen
from lowbit.runtime.load import load_model
from test_cli import run_cli
from test_kv_cache import dataset  # noqa: F401 (a fixture: calibration text)

PROMPT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def llama(tiny_dir):
    path = tiny_dir("llama")
    return path, load_model(path, torch.float32), load_tokenizer(path)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_greedy_equals_transformers_generate(tiny_dir, family, monkeypatch):
    path = tiny_dir(family)
    tok = load_tokenizer(path)
    prompt = PROMPT * 2  # 86 tokens: past gemma2's 32-token sliding window
    monkeypatch.setattr(gen, "PREFILL_CHUNK", 16)  # several prefill chunks
    ours = lowbit.generate(path, prompt, max_tokens=24, dtype=torch.float32, ignore_eos=True)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    # no EOS and a forced length on both sides: the tokens compare one for one
    theirs = hf.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    assert ours.token_ids == theirs
    assert ours.prompt_tokens == ids.shape[1] and ours.finish_reason == "length"


def test_stream_pieces_join_to_the_text(llama):
    path, model, tok = llama
    pieces = list(lowbit.stream(model, PROMPT, max_tokens=16, tokenizer=tok))
    whole = lowbit.generate(model, PROMPT, max_tokens=16, tokenizer=tok)
    assert len(pieces) > 1 and "".join(pieces) == whole.text
    assert whole.text == tok.decode(whole.token_ids, skip_special_tokens=True)


def test_a_seed_makes_sampling_reproducible(llama):
    _, model, tok = llama
    run = lambda seed: lowbit.generate(model, PROMPT, max_tokens=20, temperature=1.0, seed=seed,
                                       tokenizer=tok, ignore_eos=True).token_ids
    greedy = lowbit.generate(model, PROMPT, max_tokens=20, tokenizer=tok, ignore_eos=True).token_ids
    assert run(7) == run(7)
    assert run(7) != run(8) and run(7) != greedy


def test_top_k_one_is_greedy(llama):
    _, model, tok = llama
    greedy = lowbit.generate(model, PROMPT, max_tokens=12, tokenizer=tok, ignore_eos=True)
    sampled = lowbit.generate(model, PROMPT, max_tokens=12, temperature=5.0, top_k=1, seed=0,
                              tokenizer=tok, ignore_eos=True)
    assert sampled.token_ids == greedy.token_ids


def test_pick_draws_only_from_top_k_and_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (.5), 3 (.3), 2 (.15), 0 (.05)
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {gen.pick(logits, 1.0, generator=g, **kw) for _ in range(300)}
    assert draws(top_k=2, top_p=1.0) == {1, 3}
    assert draws(top_k=0, top_p=0.7) == {1, 3}  # .5 < .7 <= .5 + .3
    assert draws(top_k=0, top_p=0.8) == {1, 3}  # reaching top_p exactly closes the set
    assert draws(top_k=0, top_p=0.81) == {1, 3, 2}
    assert draws(top_k=0, top_p=0.4) == {1}
    assert draws(top_k=0, top_p=1.0) == {0, 1, 2, 3}
    assert gen.pick(logits, 0.0, 0, 1.0, None) == 1


def test_sampling_follows_the_tempered_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0])
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([gen.pick(logits, 2.0, 0, 1.0, g) for _ in range(4000)]),
                            minlength=3).float() / 4000
    expected = torch.tensor([0.0, 0.5, 1.0]).exp() / torch.tensor([0.0, 0.5, 1.0]).exp().sum()
    assert torch.allclose(counts, expected, atol=0.03)  # ~4 standard errors at n=4000


def test_a_stop_string_cuts_the_text_before_it(llama):
    _, model, tok = llama
    full = lowbit.generate(model, PROMPT, max_tokens=24, tokenizer=tok, ignore_eos=True)
    stop = full.text[6:9]  # spans tokens: one token per byte in the tiny tokenizer
    cut = lowbit.generate(model, PROMPT, max_tokens=24, tokenizer=tok, ignore_eos=True,
                          stop=["never appears \x00", stop])
    assert cut.text == full.text[:full.text.find(stop)] and cut.finish_reason == "stop"
    assert len(cut.token_ids) < len(full.token_ids)
    pieces = list(lowbit.stream(model, PROMPT, max_tokens=24, tokenizer=tok, ignore_eos=True, stop=stop))
    assert "".join(pieces) == cut.text  # the held-back prefix of the stop string is never shown


def test_max_tokens_and_eos_end_a_completion(llama):
    _, model, tok = llama
    r = lowbit.generate(model, PROMPT, max_tokens=5, tokenizer=tok, ignore_eos=True)
    assert len(r.token_ids) == 5 and r.decode_steps == 4 and r.finish_reason == "length"
    first = r.token_ids[0]
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = first  # the model's first greedy token is now its EOS
    try:
        ended = lowbit.generate(model, PROMPT, max_tokens=5, tokenizer=tok)
        ignored = lowbit.generate(model, PROMPT, max_tokens=5, tokenizer=tok, ignore_eos=True)
    finally:
        model.generation_config.eos_token_id = eos
    assert ended.token_ids == [first] and ended.finish_reason == "eos" and ended.text == ""
    assert ignored.token_ids == r.token_ids


def test_token_ids_are_a_prompt_as_they_are(llama):
    _, model, tok = llama
    ids = tok(PROMPT)["input_ids"]
    assert lowbit.generate(model, ids, max_tokens=6, tokenizer=tok).token_ids == \
        lowbit.generate(model, PROMPT, max_tokens=6, tokenizer=tok).token_ids


def test_chat_messages_go_through_the_chat_template(llama):
    _, model, tok = llama
    messages = [{"role": "user", "content": "hi"}]
    r = lowbit.generate(model, messages, max_tokens=4, tokenizer=tok, ignore_eos=True)
    rendered = "<s><|user|>hi</s>\n<|assistant|>"  # the tiny template, written out
    same = lowbit.generate(model, rendered, max_tokens=4, tokenizer=tok, ignore_eos=True)
    assert r.prompt_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"])
    assert r.token_ids == same.token_ids


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(stop=[""]), "stop"),
    (dict(prompt=17), "prompt"), (dict(prompt=""), "no tokens"),
    (dict(prompt=[{"content": "no role"}]), "prompt"), (dict(prompt=[1, "a"]), "prompt"),
    (dict(max_tokens=250), "at most 256"),  # the tiny model's position limit
])
def test_bad_arguments_are_lowbit_errors(llama, kwargs, message):
    _, model, tok = llama
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(lowbit.LowbitError, match=message):
        lowbit.generate(model, kwargs.pop("prompt"), tokenizer=tok, **kwargs)


def test_cli_streams_the_completion_and_reports_bad_input_in_one_line(llama, tmp_path):
    path, model, tok = llama
    expected = lowbit.generate(path, PROMPT, max_tokens=6, ignore_eos=True).text
    code, out, err = run_cli("generate", path, "--prompt", PROMPT, "--max-tokens", "6", "--ignore-eos")
    assert code == 0 and out == expected + "\n" and "6 new" in err and "KV cache" in err
    code, out, err = run_cli("generate", path, "--prompt", PROMPT, "--top-p", "2")
    assert code == 2 and err.count("\n") == 1 and "top_p" in err
    code, _, err = run_cli("generate", tmp_path, "--prompt", PROMPT)
    assert code == 2 and "config.json" in err


def test_cli_chat_keeps_the_conversation(llama, monkeypatch):
    path, _, _ = llama
    turns = iter(["hello", "and again"])
    seen = []
    real = gen.stream

    def user(prompt=""):
        try:
            return next(turns)
        except StopIteration:
            raise EOFError from None  # Ctrl-D

    def stream(model, messages, **kw):
        seen.append([dict(m) for m in messages])
        yield from real(model, messages, **kw)

    monkeypatch.setattr("builtins.input", user)
    monkeypatch.setattr(gen, "stream", stream)
    code, out, _ = run_cli("generate", path, "--chat", "--max-tokens", "3")
    assert code == 0 and len(seen) == 2
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"]
    assert seen[1][0]["content"] == "hello" and seen[1][2]["content"] == "and again"


@pytest.mark.e2e
def test_smollm2_greedy_knows_the_capital_of_france(smollm2_dir):
    r = lowbit.generate(smollm2_dir, "The capital of France is", max_tokens=8)
    assert "Paris" in r.text


def test_kv_bytes_is_what_the_static_cache_allocates(llama):
    from lowbit.runtime.kv_cache import kv_bytes, static_cache

    _, model, _ = llama
    cache = static_cache(model, 40)
    model(input_ids=torch.tensor([[5, 6, 7]]), **{gen._cache_kwarg(model): cache}, use_cache=True)
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert held == kv_bytes(model, 40, 4)


def test_a_stop_prefix_before_an_unfinished_character_is_held_back():
    class Bytes:  # a tokenizer whose token ids are bytes
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", "replace")

    text = gen.StopText(Bytes(), (";é",))
    pieces = [text.update(list(";".join(["ab", "é"]).encode()[:n])) for n in range(1, 6)]
    # after "ab;" comes the first byte of "é": ";" must stay held back until "é" is whole
    assert "".join(pieces) == "ab" and text.stopped and text.text == "ab"


# one scheme per kernel family: the C INT4 kernel (group 64), torch's int4pack (group 32),
# FBGEMM on C-coded inputs, the C INT8, FP8 and FP4 row kernels (custom ops)
@pytest.mark.parametrize("scheme", ["W4A16", "W4A16_ASYM", "W8A8_INT8", "W8A16", "FP8_DYNAMIC", "NVFP4A16"])
def test_a_compiled_decode_step_generates_what_the_eager_one_does(tiny_dir, dataset, tmp_path, scheme):
    """compile=True: the same greedy tokens as eager decoding (float32, where Inductor's fused
    loops differ from eager only in rounding order), logits within 1e-5; the graph is made once
    for all requests whose cache rounds to the same length, whole (no graph breaks at a kernel)."""
    from lowbit.runtime.compiled import BUCKET, cache_len

    out = tmp_path / scheme
    lowbit.quantize(tiny_dir("llama"), out, scheme, dataset=str(dataset), samples=4, seq_len=32,
                    group_size={"W4A16": 64, "W4A16_ASYM": 32}.get(scheme), algorithm="rtn")
    from torch._dynamo.utils import counters

    model, tok = load_model(out, torch.float32, packed=True), load_tokenizer(out)
    eager = lowbit.generate(model, PROMPT, max_tokens=12, tokenizer=tok, ignore_eos=True)
    graphs = counters["stats"]["unique_graphs"]
    first = lowbit.generate(model, PROMPT, max_tokens=12, tokenizer=tok, ignore_eos=True, compile=True)
    made = counters["stats"]["unique_graphs"]
    again = lowbit.generate(model, PROMPT * 2, max_tokens=20, tokenizer=tok, ignore_eos=True, compile=True)
    assert first.token_ids == eager.token_ids
    assert first.compile_seconds > 0 and again.compile_seconds == 0.0
    # one whole graph (a graph break at a kernel would make several), made before the
    # request's first timed step: none by the second request
    assert made == graphs + 1 and counters["stats"]["unique_graphs"] == made
    assert cache_len(model, 43 + 12) == BUCKET == cache_len(model, 86 + 20)
    # one step's logits, eager and compiled, from the same cache state
    from lowbit.runtime.compiled import decode_step
    from lowbit.runtime.generate import _cache_kwarg
    from lowbit.runtime.kv_cache import static_cache

    step, _ = decode_step(model, BUCKET)
    logits = []
    for f in (model, step):
        cache = static_cache(model, BUCKET)
        kw = {_cache_kwarg(model): cache, "use_cache": True}
        with torch.inference_mode():
            model(input_ids=torch.tensor([list(range(5, 25))]), position_ids=torch.arange(20)[None], **kw)
            logits.append(f(input_ids=torch.tensor([[30]]), position_ids=torch.tensor([[20]]), **kw).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["c", "torch"])
@pytest.mark.parametrize("mask_kind, kv_dtype", [("bool", torch.float32), ("float", torch.float32),
                                                 ("none", torch.bfloat16), ("bool", torch.bfloat16)])
def test_packed_decode_attention_matches_a_float64_reference(path, mask_kind, kv_dtype):
    """compiled.py's one-token attention, through the C kernel (reading only the positions the
    mask leaves) or torch's SDPA with the query heads packed per KV head, against softmax
    attention written here in float64, with the KV heads repeated per query head and a mask
    that hides the cache's unfilled tail (bool, or additive with finite values too); other
    shapes go to transformers' SDPA unchanged."""
    from types import SimpleNamespace

    from lowbit.runtime import kernels_cpu
    from lowbit.runtime.compiled import _decode_sdpa

    if path == "c" and kernels_cpu.library() is None:
        pytest.skip("no C compiler: the C kernel is not built")
    g = torch.Generator().manual_seed(0)
    heads, kv, d, length, filled = 8, 2, 16, 24, 17
    q, k, v = (torch.randn(1, h, n, d, generator=g) for h, n in ((heads, 1), (kv, length), (kv, length)))
    q, k, v = q.to(kv_dtype), k.to(kv_dtype), v.to(kv_dtype)
    keep = (torch.arange(length) < filled).reshape(1, 1, 1, length)
    add = torch.zeros(1, 1, 1, length).masked_fill(~keep, float("-inf"))
    mask = {"bool": keep, "none": None,
            "float": add + torch.randn(add.shape, generator=g).masked_fill(~keep, 0)}[mask_kind]
    assert kernels_cpu.attention_decode_fits(q, k, v, mask)
    module = SimpleNamespace(num_key_value_groups=heads // kv, is_causal=True, training=False,
                             _lowbit_c_attention=path == "c")  # as compiled._pack_gqa sets it
    out, _ = _decode_sdpa(module, q, k, v, mask, scaling=0.25)
    kr, vr = (t.double().repeat_interleave(heads // kv, 1) for t in (k, v))
    scores = q.double() @ kr.transpose(2, 3) * 0.25
    scores = scores if mask is None else scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
        else scores + mask.double()
    want = (scores.softmax(-1) @ vr).transpose(1, 2)  # [1, 1, heads, d], as attention returns
    assert out.shape == want.shape and out.dtype == q.dtype
    # float32 sums of d and `filled` terms (the C kernel's exp: 2e-7 relative); bf16 tensors:
    # the output's own rounding (2^-9 relative) and, in torch's kernel, its bf16 intermediates
    tol = 1e-5 if kv_dtype == torch.float32 else 2**-6
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    prefill = torch.randn(1, heads, 3, d, generator=g).to(kv_dtype)  # several queries: not packed, same result
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.testing.assert_close(_decode_sdpa(module, prefill, k, v, None)[0],
                               sdpa_attention_forward(module, prefill, k, v, None)[0])
