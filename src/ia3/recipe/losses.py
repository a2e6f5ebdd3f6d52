"""Label scoring and the T-Few losses (Liu et al. 2022, https://arxiv.org/abs/2205.05638, section 3.2)."""

from __future__ import annotations

import torch


def tfew_losses(token_logprobs: torch.Tensor, token_mask: torch.Tensor, gold: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three T-Few loss terms over every answer choice.

    Args:
        token_logprobs: `(B, C, T)` log-probability of each token of each choice (label string).
        token_mask: `(B, C, T)` 1 for real tokens, 0 for padding.
        gold: `(B,)` index of the correct choice.

    Returns:
        `lm`: mean NLL of the gold choice's tokens (token-weighted over the batch, as a seq2seq LM loss);
        `ul`: unlikelihood, `-sum log(1 - p)` over the tokens of every wrong choice / their token count;
        `ln`: cross-entropy of the softmax over length-normalised choice scores `beta = mean_t log p`;
        `total`: `lm + ul + ln`.
    """
    mask = token_mask.to(token_logprobs.dtype)
    logprobs = token_logprobs * mask
    batch = torch.arange(gold.shape[0], device=gold.device)
    gold_lp, gold_mask = logprobs[batch, gold], mask[batch, gold]  # (B, T)
    lm = -gold_lp.sum() / gold_mask.sum()
    wrong = torch.ones_like(mask[..., 0])  # (B, C)
    wrong[batch, gold] = 0
    wrong_mask = mask * wrong.unsqueeze(-1)
    # log(1 - p) computed stably from log p: log(-expm1(log p)); clamp keeps p = 1 finite
    log_one_minus_p = torch.log(-torch.expm1(token_logprobs.clamp(max=-1e-6)))
    ul = -(log_one_minus_p * wrong_mask).sum() / wrong_mask.sum().clamp(min=1)
    beta = logprobs.sum(-1) / mask.sum(-1).clamp(min=1)  # (B, C)
    ln = torch.nn.functional.cross_entropy(beta, gold)
    return {"lm": lm, "ul": ul, "ln": ln, "total": lm + ul + ln}
