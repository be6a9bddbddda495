"""compare(): perplexity, KL(baseline || model) and top-1 agreement, against a float64 reference
written here from the definitions."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.metrics import compare
from tiny import tiny_model


def windows(seed: int, n: int = 3, length: int = 33) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 256, (length,), generator=g) for _ in range(n)]


def perturbed(model: torch.nn.Module, seed: int, size: float = 0.5) -> torch.nn.Module:
    """A copy of `model` with every weight nudged by relative noise: close enough that the
    argmax often agrees, far enough that it sometimes does not."""
    g = torch.Generator().manual_seed(seed)
    other = tiny_model("llama")
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1 + size * torch.randn(p.shape, generator=g))
    return other


@torch.no_grad()
def reference(model, wins, baseline=None) -> dict:
    """The definitions in float64: ppl = exp(mean NLL of the next token); KL(base || model) and
    argmax agreement averaged over every predicted position."""
    nll, base_nll, kl, agree, tokens = 0.0, 0.0, 0.0, 0, 0
    for ids in wins:
        target = ids[1:]
        logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].double(), -1)
        nll -= logp[torch.arange(len(target)), target].sum().item()
        tokens += len(target)
        if baseline is not None:
            logq = torch.log_softmax(baseline(input_ids=ids[None]).logits[0, :-1].double(), -1)
            base_nll -= logq[torch.arange(len(target)), target].sum().item()
            kl += (logq.exp() * (logq - logp)).sum().item()
            agree += (logq.argmax(-1) == logp.argmax(-1)).sum().item()
    out = {"ppl": math.exp(nll / tokens), "tokens": tokens}
    if baseline is not None:
        out.update(baseline_ppl=math.exp(base_nll / tokens), kl=kl / tokens, top1=agree / tokens)
    return out


@pytest.fixture(scope="module")
def models():
    base = tiny_model("llama", seed=0)
    return {"base": base, "unrelated": tiny_model("llama", seed=1), "close": perturbed(base, seed=2)}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("other", ["unrelated", "close"])
def test_compare_matches_the_float64_definitions(models, other, seed):
    model, base, wins = models[other], models["base"], windows(seed)
    got, want = compare(model, wins, base), reference(model, wins, base)
    assert set(got) == {"ppl", "baseline_ppl", "kl", "top1", "tokens"}
    assert got["tokens"] == want["tokens"] == 3 * 32
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-6)
    assert got["baseline_ppl"] == pytest.approx(want["baseline_ppl"], rel=1e-6)
    assert want["kl"] > 1e-4  # the pair really differs, so the comparison below means something
    assert got["kl"] == pytest.approx(want["kl"], rel=1e-4, abs=1e-7)
    assert got["top1"] == want["top1"]


def test_the_close_pair_agrees_on_some_positions_but_not_all(models):
    """Guards the fixture: with top1 at 0 or 1 the agreement check above could not fail."""
    r = reference(models["close"], windows(0), models["base"])
    assert 0 < r["top1"] < 1


def test_kl_is_the_baseline_direction(models):
    """KL(base || model) is asymmetric: swapping the roles gives the other direction."""
    wins = windows(0)
    forward = compare(models["unrelated"], wins, models["base"])["kl"]
    backward = compare(models["base"], wins, models["unrelated"])["kl"]
    assert forward == pytest.approx(reference(models["unrelated"], wins, models["base"])["kl"], rel=1e-4)
    assert backward == pytest.approx(reference(models["base"], wins, models["unrelated"])["kl"], rel=1e-4)
    assert forward != pytest.approx(backward, rel=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_model_compared_with_itself_has_zero_kl_and_full_agreement(models, seed):
    r = compare(models["base"], windows(seed), models["base"])
    assert r["kl"] == 0
    assert r["top1"] == 1
    assert r["ppl"] == r["baseline_ppl"]


def test_without_a_baseline_only_perplexity_is_reported(models):
    wins = windows(3)
    r = compare(models["close"], wins)
    assert set(r) == {"ppl", "tokens"}
    assert r["ppl"] == pytest.approx(reference(models["close"], wins)["ppl"], rel=1e-6)
    # a near-uniform random model over 256 tokens has perplexity near 256
    assert 100 < r["ppl"] < 600
