"""The decoder's batched sampling (`ia3.serve.decoding.distributions`) keeps exactly the distribution of the plain
full-vocabulary computation (`full_distribution`) for every mix of temperature, top-k, top-p and min-p."""

from __future__ import annotations

import pytest
import torch

from ia3.serve.decoding import (
    CANDIDATES,
    WIDE_CANDIDATES,
    Row,
    RowError,
    Sampling,
    distributions,
    draw,
    full_distribution,
    next_tokens,
)

VOCAB = 3000

SETTINGS = [
    Sampling(temperature=1.0),
    Sampling(temperature=0.7, top_p=0.9),
    Sampling(temperature=1.3, top_p=0.999),  # the candidates' mass rarely reaches it: the whole vocabulary
    Sampling(temperature=0.5, top_k=5),
    Sampling(temperature=1.0, top_k=CANDIDATES),
    Sampling(temperature=1.0, top_k=CANDIDATES + 7),  # more than the candidates: the wide candidates
    Sampling(temperature=1.0, top_k=WIDE_CANDIDATES + 7),  # more than those too: the plain computation
    Sampling(temperature=1.0, top_k=40, top_p=0.5),
    Sampling(temperature=2.0, min_p=0.05),
    Sampling(temperature=5.0, min_p=0.0001),  # the floor under the last candidate is not sure: the plain way
    Sampling(temperature=0.9, top_p=0.8, min_p=0.1),
    Sampling(temperature=1e-3, top_p=0.9),
]


def _dense(kept, vocab: int) -> torch.Tensor:
    ids, probs = kept
    if ids is None:
        return probs
    return torch.zeros(vocab).index_put_((ids,), probs)


@pytest.mark.parametrize("spread", [1.0, 4.0, 12.0])  # flat to peaked logits
def test_batched_distributions_equal_the_full_computation(spread):
    g = torch.Generator().manual_seed(int(spread))
    scores = torch.randn(len(SETTINGS), VOCAB, generator=g) * spread
    kept = distributions(scores, SETTINGS)
    for i, s in enumerate(SETTINGS):
        scaled = (scores[i] - scores[i].max()) / s.temperature
        reference = full_distribution(scaled, s)
        got = _dense(kept[i], VOCAB)
        assert torch.allclose(got, reference, atol=1e-6), (s, (got - reference).abs().max())
        assert torch.equal(got > 0, reference > 0), s  # the same tokens kept


def test_a_flat_top_p_is_decided_by_the_wide_candidates_exactly(monkeypatch):
    """Top-p over 300 nearly equal tokens: the first 64 candidates hold too little mass to decide, the 1024 wide
    ones do, and the kept tokens and probabilities equal the plain computation's (which is not called)."""
    scores = torch.full((2, VOCAB), -30.0)
    scores[:, :300] = torch.linspace(0.0, -1.0, 300)
    scores[1] = scores[1, torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))]
    settings = [Sampling(temperature=1.0, top_p=0.9), Sampling(temperature=0.7, top_p=0.8, min_p=0.3)]
    references = [full_distribution((scores[i] - scores[i].max()) / s.temperature, s) for i, s in enumerate(settings)]

    def refuse(*_):
        raise AssertionError("the whole vocabulary was sorted")

    monkeypatch.setattr("ia3.serve.decoding.full_distribution", refuse)
    kept = distributions(scores, settings)
    for got, reference in zip(kept, references):
        assert got[0] is not None and CANDIDATES < got[0].numel() < WIDE_CANDIDATES
        assert torch.equal(_dense(got, VOCAB) > 0, reference > 0)
        assert torch.allclose(_dense(got, VOCAB), reference, atol=1e-6)


def test_rows_with_no_valid_distribution_fail_alone():
    scores = torch.randn(2, VOCAB)
    scores[0] = float("-inf")  # e.g. every token banned
    kept = distributions(scores, [Sampling(temperature=1.0), Sampling(temperature=1.0, top_p=0.9)])
    assert isinstance(kept[0], RowError) and not isinstance(kept[1], RowError)


def test_next_tokens_samples_from_the_kept_tokens_with_each_rows_generator():
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB) * 3
    settings = Sampling(temperature=0.8, top_k=3, seed=7)

    def pick(row_logits):
        row = Row([1, 2], "a", 4, settings, generator=torch.Generator().manual_seed(7))
        return next_tokens(row_logits, [row])[0]

    alone = pick(logits[1:2])
    assert alone in logits[1].topk(3).indices.tolist()
    rows = [Row([1], "a", 4, settings, generator=torch.Generator().manual_seed(s)) for s in (1, 7, 3)]
    assert next_tokens(logits, rows)[1] == alone  # the same row and seed picks the same token in any batch


def test_draw_follows_the_probabilities():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2])
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([draw(probs, g) for _ in range(20000)]), minlength=5).float() / 20000
    assert counts[0] == 0 and counts[2] == 0  # tokens without probability are never drawn
    assert torch.allclose(counts, probs, atol=0.015)
