"""Perplexity on held-out windows; against a baseline, next-token KL divergence and top-1 agreement."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .progress import progress


@torch.no_grad()
def compare(model: nn.Module, windows: list[torch.Tensor], baseline: nn.Module | None = None) -> dict:
    """Metrics over token windows (each 1-D): ppl, and with a baseline its baseline_ppl, kl (mean
    KL(base || model) per predicted token, nats) and top1 (fraction of positions whose argmax agrees).

    Windows are scored one at a time so memory holds one window's logits, not the whole set.
    """
    nll, base_nll, kl, agree, tokens = 0.0, 0.0, 0.0, 0, 0
    for ids in progress(windows, "evaluating"):
        ids = ids.reshape(1, -1).to(next(model.parameters()).device)
        # float32 log-probs; per-token sums are accumulated in float64
        logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        target = ids[0, 1:]
        nll -= logp.gather(1, target[:, None]).double().sum().item()
        tokens += target.numel()
        if baseline is not None:
            base = F.log_softmax(baseline(input_ids=ids).logits[0, :-1].float(), dim=-1)
            base_nll -= base.gather(1, target[:, None]).double().sum().item()
            kl += (base.exp() * (base - logp)).sum(-1).double().sum().item()
            agree += (base.argmax(-1) == logp.argmax(-1)).sum().item()
    result = {"ppl": math.exp(nll / tokens), "tokens": tokens}
    if baseline is not None:
        result["baseline_ppl"] = math.exp(base_nll / tokens)
        result["kl"] = kl / tokens
        result["top1"] = agree / tokens
    return result
