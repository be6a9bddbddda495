"""Batched decoding where every request is at its own position (gpt-fast / vLLM style).

transformers' StaticCache has one cache_position for the whole batch, so requests that joined
at different times cannot share a forward through it. Here each request owns a slot of a
preallocated cache, [slots, kv_heads, max_len, head_dim] keys and values per layer, and one
forward takes any set of slots with a position per token:

    prefill(slot, ids)                          # one request's prompt into its slot, in chunks
    prefill_many(slots, chunks, starts)         # several prompts' next chunks, padded, one forward
    decode(slots, tokens, positions)            # one token for each running request, one forward

The model's own modules do the work (embedding, norms, q/k/v/o projections, which are lowbit's
packed Linears after lowbit.load, the rotary embedding, the MLP, lm_head); only attention is
written here, with SDPA and a per-row mask: row b sees positions <= positions[b] of its own
slot (and, for sliding-window layers, only the last `window` of them). Whatever a previous
occupant left in a slot beyond that is masked, so freeing a slot costs nothing.
"""

from __future__ import annotations

import inspect
import sys
from collections import deque
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LowbitError
from .kv_cache import FP8, fp8_decode, fp8_encode, kv_scales

PREFILL_CHUNK = 256  # prompt tokens per forward during prefill
# decoder layers of the Llama shape, and Gemma 2/3's (norms around attention and MLP, soft-capping)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text")


def _text_config(model: nn.Module):
    c = model.config
    return c.get_text_config() if hasattr(c, "get_text_config") else c


class SlotCache:
    """Per-layer key and value tensors [slots, kv_heads, max_len, head_dim], written in place:
    in `dtype`, or FP8 codes under each layer's (k_scale, v_scale) where the model stores its
    KV cache so (kv_cache.kv_scales)."""

    def __init__(self, model: nn.Module, slots: int, max_len: int, dtype: torch.dtype):
        c = _text_config(model)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        shape = (slots, kv_heads, max_len, head_dim)
        self.scales = kv_scales(model)
        dtype = FP8 if self.scales is not None else dtype
        self.bytes = 2 * c.num_hidden_layers * slots * kv_heads * max_len * head_dim * dtype.itemsize
        try:
            self.keys = [torch.zeros(shape, dtype=dtype) for _ in range(c.num_hidden_layers)]
            self.values = [torch.zeros(shape, dtype=dtype) for _ in range(c.num_hidden_layers)]
        except (RuntimeError, MemoryError):  # torch reports a failed allocation as RuntimeError
            raise LowbitError(f"the KV cache for {slots} requests of {max_len} positions needs "
                              f"{self.bytes / 2**30:.1f} GiB, more than this machine could allocate: "
                              "lower --max-batch or --max-len") from None
        self.slots, self.max_len = slots, max_len

    def write(self, i: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Layer i's new keys and values [B, kv_heads, T, d] at `positions` [B, T] of `slots`."""
        if self.scales is not None:
            k, v = fp8_encode(k, self.scales[i][0]), fp8_encode(v, self.scales[i][1])
        # advanced indices around a slice put their [B, T] first: [B, T, kv_heads, d]
        self.keys[i][slots[:, None], :, positions] = k.transpose(1, 2).to(self.keys[i].dtype)
        self.values[i][slots[:, None], :, positions] = v.transpose(1, 2).to(self.values[i].dtype)

    def read(self, i: int, slots: torch.Tensor, seen: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's first `seen` positions of `slots`, [B, kv_heads, seen, d] in `dtype`."""
        K, V = self.keys[i][slots, :, :seen], self.values[i][slots, :, :seen]
        if self.scales is not None:
            return fp8_decode(K, self.scales[i][0], dtype), fp8_decode(V, self.scales[i][1], dtype)
        return K.to(dtype), V.to(dtype)


def unsupported(model: nn.Module) -> str | None:
    """Why BatchDecoder cannot run `model` (its family has no path here), or None."""
    family = getattr(_text_config(model), "model_type", "?")
    return None if family in FAMILIES else f"batched decoding runs {', '.join(FAMILIES)} models; " \
        f"{family!r} is not one of them"


class BatchDecoder:
    """A loaded model with a slot cache: prefill one request, decode many at mixed positions."""

    def __init__(self, model: nn.Module, slots: int, max_len: int):
        c = _text_config(model)
        reason = unsupported(model)
        if reason:
            raise LowbitError(f"{reason}: use --engine vllm")
        limit = getattr(c, "max_position_embeddings", None)
        if limit and max_len > limit:
            raise LowbitError(f"max_len {max_len} is beyond the model's {limit} positions")
        self.model, self.config, self.max_len = model, c, max_len
        self.base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.dtype = self.base.embed_tokens.weight.dtype
        self.cache = SlotCache(model, slots, max_len, self.dtype)
        attn = self.base.layers[0].self_attn
        # each family's own rotation (Phi-3's handles a partial rotary dimension)
        self._rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        # Gemma 3: local and global layers rotate with different frequencies
        self._layer_types = "layer_type" in inspect.signature(self.base.rotary_emb.forward).parameters

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int], start: int = 0, chunk: int | None = None) -> torch.Tensor:
        """Write `ids` (positions start, start+1, ...) into `slot`, in chunks; the last-position
        logits [vocab] (float32, or float64 for a float64 model)."""
        chunk = chunk or PREFILL_CHUNK
        for at in range(0, len(ids), chunk):
            logits = self.prefill_many([slot], [ids[at:at + chunk]], [start + at])
        return logits[0]

    @torch.inference_mode()
    def prefill_many(self, slots: list[int], chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Several requests' prompt pieces in one forward: `chunks[b]` goes to positions starts[b],
        ... of slot `slots[b]`. Shorter pieces are padded; the padding lands in the cache after the
        piece's last position, which that request only reads after writing it again, so it is
        harmless. Returns each piece's last-position logits [B, vocab]."""
        self._check(max(s + len(c) for s, c in zip(starts, chunks)) - 1)
        T = max(len(c) for c in chunks)
        ids = torch.tensor([c + [0] * (T - len(c)) for c in chunks])
        positions = torch.tensor(starts)[:, None] + torch.arange(T)
        # padding past the cache's end is parked on its last position, which a request reaches only
        # at its final token (prompt plus max_tokens fits) and writes then
        positions = positions.clamp(max=self.max_len - 1)
        return self._forward(torch.tensor(slots), ids, positions, torch.tensor([len(c) - 1 for c in chunks]))

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One new token for each request: `tokens[b]` sits at `positions[b]` of slot `slots[b]`.
        Returns the next-token logits [len(slots), vocab]."""
        self._check(max(positions))
        return self._forward(torch.tensor(slots), torch.tensor(tokens).unsqueeze(1),
                             torch.tensor(positions).unsqueeze(1), torch.zeros(len(slots), dtype=torch.long))

    def _check(self, position: int) -> None:
        if position >= self.max_len:
            raise LowbitError(f"position {position} is beyond the cache's {self.max_len}")

    def _forward(self, slots: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
                 last: torch.Tensor) -> torch.Tensor:
        """slots [B], ids and positions [B, T] -> logits at each row's index `last[b]` [B, vocab]."""
        h = self.base.embed_tokens(ids)  # Gemma's embedding module scales by sqrt(hidden) itself
        rope = {}
        seen = int(positions.max()) + 1  # keys past every row's position are masked anyway
        visible = torch.arange(seen)[None, None, :] <= positions[:, :, None]  # [B, T, seen]
        for i, layer in enumerate(self.base.layers):
            kind = getattr(layer.self_attn, "layer_type", None) if self._layer_types else None
            if kind not in rope:
                rope[kind] = self.base.rotary_emb(h, positions, **({"layer_type": kind} if kind else {}))
            if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma: a norm before and after each
                a = self._attention(i, layer.self_attn, layer.input_layernorm(h), *rope[kind], slots,
                                    positions, visible, seen)
                h = h + layer.post_attention_layernorm(a)
                h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
                continue
            h = h + self._attention(i, layer.self_attn, layer.input_layernorm(h), *rope[kind], slots,
                                    positions, visible, seen)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.base.norm(h[torch.arange(len(last)), last][:, None])
        logits = self.model.lm_head(h)[:, 0]
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:  # Gemma 2
            logits = torch.tanh(logits / cap) * cap
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def _attention(self, i: int, attn: nn.Module, x: torch.Tensor, cos, sin, slots, positions,
                   visible, seen) -> torch.Tensor:
        B, T, _ = x.shape
        d = attn.head_dim
        if hasattr(attn, "qkv_proj"):  # Phi-3: one fused projection, q then k then v
            qkv = attn.qkv_proj(x)
            nq = self.config.num_attention_heads * d
            nkv = (qkv.shape[-1] - nq) // 2
            q, k, v = qkv[..., :nq], qkv[..., nq:nq + nkv], qkv[..., nq + nkv:]
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q, k, v = (t.view(B, T, -1, d) for t in (q, k, v))
        if hasattr(attn, "q_norm"):  # Qwen3, Gemma 3: RMSNorm over each head before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, d]
        q, k = self._rotate(q, k, cos, sin)
        hook = attn.__dict__.get("_lowbit_kv_hook")
        if hook is not None:  # a simulated FP8 cache: what is stored is what attention reads
            k, v = hook(attn, k, v)
        self.cache.write(i, slots, positions, k, v)
        K, V = self.cache.read(i, slots, seen, q.dtype)  # [B, kv_heads, seen, d]
        mask = visible
        window = self._window(attn)
        if window:  # transformers: key j is seen from query i when j > i - window
            mask = mask & (torch.arange(seen)[None, None, :] > positions[:, :, None] - window)
        mask = mask[:, None]
        cap = getattr(attn, "attn_logit_softcapping", None) or getattr(self.config, "attn_logit_softcapping", None)
        if cap:  # Gemma 2 caps the scores with tanh before the softmax, which SDPA cannot do
            K, V = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (K, V))
            scores = torch.tanh(q @ K.transpose(2, 3) * attn.scaling / cap) * cap
            probs = scores.masked_fill(~mask, float("-inf")).softmax(
                -1, dtype=torch.promote_types(q.dtype, torch.float32))
            out = probs.to(q.dtype) @ V
        else:
            out = F.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
        return attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _window(self, attn: nn.Module) -> int | None:
        if hasattr(attn, "sliding_window"):  # Qwen2/3, Gemma set it per layer (None on full layers)
            return attn.sliding_window
        return getattr(self.config, "sliding_window", None)  # Mistral, Phi-3: every layer


def generate_batch(model: nn.Module, tokenizer, prompts: Sequence, *, max_tokens: int,
                   stop: Sequence[str] = (), batch: int = 8, on_done=None) -> list:
    """Greedy completions of `prompts` (as lowbit.generate takes them), up to `batch` of them
    decoding together in a BatchDecoder's slots: a finished request's slot takes the next
    prompt at once (continuous batching, without threads). Ends and text as generate()'s (the
    shared `ending` rule), so each Generation's tokens are generate()'s up to rounding: equal
    in float32/float64; bf16 rounds a batched row differently and can flip a greedy near-tie.
    `on_done()` is called after each finished request (progress). Returns one Generation per
    prompt, in order."""
    from .generate import Generation, StopText, encode, ending, eos_ids, options, pick

    o = options(max_tokens, stop=stop)
    ids = [encode(tokenizer, p) for p in prompts]
    out = [Generation(prompt_tokens=len(i)) for i in ids]
    if not ids:
        return out
    slots = min(batch, len(ids))
    decoder = BatchDecoder(model, slots, max(len(i) for i in ids) + max_tokens)
    eos, texts = eos_ids(model, tokenizer), {}
    # longest prompts first, so prompts prefilled together are padded little (results keep their order)
    waiting = deque(sorted(range(len(ids)), key=lambda n: -len(ids[n])))
    free, running = list(range(slots)), {}  # running: slot -> request

    def emit(slot: int, logits: torch.Tensor) -> None:
        n, g = running[slot], out[running[slot]]
        g.token_ids.append(pick(logits, 0.0, 0, 1.0, None))
        reason, _ = ending(g.token_ids, eos, texts[n], o.max_tokens)
        if reason:
            g.finish_reason, g.text = reason, texts[n].text
            del running[slot]
            free.append(slot)
            if on_done:
                on_done()

    while waiting or running:
        admitted = []  # (slot, request): whole prompts in, in padded chunks, before the next decode
        while waiting and free:
            slot, n = free.pop(), waiting.popleft()
            running[slot], texts[n] = n, StopText(tokenizer, o.stop)
            admitted.append((slot, n))
        for at in range(0, max((len(ids[n]) for _, n in admitted), default=0), PREFILL_CHUNK):
            rows = [(s, n) for s, n in admitted if len(ids[n]) > at]  # prompts not yet all in
            logits = decoder.prefill_many([s for s, _ in rows], [ids[n][at:at + PREFILL_CHUNK] for _, n in rows],
                                          [at] * len(rows))
            for (s, n), row in zip(rows, logits):
                if len(ids[n]) <= at + PREFILL_CHUNK:  # its last piece: the first new token
                    emit(s, row)
        if running:  # one forward: every running request's last token at its own position
            step = list(running)
            logits = decoder.decode(step, [out[running[s]].token_ids[-1] for s in step],
                                    [len(ids[running[s]]) + len(out[running[s]].token_ids) - 1 for s in step])
            for s, row in zip(step, logits):
                emit(s, row)
    return out
