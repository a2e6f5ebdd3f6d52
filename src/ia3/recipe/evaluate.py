"""Evaluation (loss, perplexity, accuracy by generation and by rank classification, F1) and prediction."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from ia3.recipe.features import Encoded, epoch_batches
from ia3.recipe.metrics import classification_report


def match_label(text: str, label_names: list[str]) -> int:
    """Index of the label a generated text names exactly (after stripping), else -1."""
    text = text.strip().split("\n")[0].strip()
    return label_names.index(text) if text in label_names else -1


@torch.no_grad()
def score_batch(
    model: nn.Module, enc: Encoded, indices: list[int], device: torch.device | str | None
) -> tuple[list[int], list[list[float]], float, int]:
    """Rank classification of one batch: (predicted ids, per-label scores, summed gold NLL, gold token count).

    Generative tasks: a label's score is its mean token log-probability (length-normalised); cls: the logits.
    """
    scores, nll, units = enc.task.score(model, enc.inputs(indices), enc.choice_ids, device)
    gold = torch.tensor(enc.gold(indices), device=scores.device)
    rows = torch.arange(len(indices), device=scores.device)
    return scores.argmax(-1).tolist(), scores.tolist(), float(nll[rows, gold].sum()), int(units[rows, gold].sum())


@torch.no_grad()
def generate_labels(
    model: nn.Module, enc: Encoded, indices: list[int], label_length: int, device: torch.device | str | None
) -> list[str]:
    """Greedy generation of up to `label_length` new tokens per input, decoded."""
    return enc.task.generate(model, enc.inputs(indices), device, max_new_tokens=label_length)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    enc: Encoded,
    label_names: list[str],
    *,
    batch_size: int = 32,
    label_length: int = 3,
    generation: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Metrics of `model` on `enc` and each example's predictions.

    Returns:
        (metrics, predictions): metrics has `loss`, `ppl`, `accuracy` (rank classification; for cls the argmax of
        the head), `macro_f1`, `per_class`, `confusion`, and for label generation `generation_accuracy`;
        predictions has one dict per example in `enc` order: `label`, `scores` and `generated` (if generated).
    """
    device = device or next(model.parameters()).device
    generation = generation and enc.task.generates
    was_training = model.training
    model.eval()
    n = len(enc)
    rank = [0] * n
    scores: list[list[float]] = [[] for _ in range(n)]
    generated: list[str | None] = [None] * n
    nll = 0.0
    tokens = 0
    batches = epoch_batches(enc.lengths(), batch_size, 0, 0, group_by_length=True, shuffle=False)
    for indices in tqdm(batches, desc="eval", leave=False, disable=not progress):
        pred, sc, batch_nll, count = score_batch(model, enc, indices, device)
        nll += batch_nll
        tokens += count
        for i, p, s in zip(indices, pred, sc):
            rank[i], scores[i] = p, s
        if generation:
            for i, text in zip(indices, generate_labels(model, enc, indices, label_length, device)):
                generated[i] = text
    model.train(was_training)
    golds = enc.labels
    metrics = classification_report(golds, rank, label_names)
    metrics["loss"] = nll / max(tokens, 1)
    metrics["ppl"] = math.exp(min(metrics["loss"], 50))
    metrics["n"] = n
    if generation:
        gen_ids = [match_label(t or "", label_names) for t in generated]
        gen_report = classification_report(golds, gen_ids, label_names)
        metrics["generation_accuracy"] = gen_report["accuracy"]
        metrics["generation_macro_f1"] = gen_report["macro_f1"]
    predictions = []
    for i in range(n):
        row = {"label": label_names[rank[i]], "label_id": rank[i], "scores": dict(zip(label_names, scores[i]))}
        if generated[i] is not None:
            row["generated"] = generated[i]
        predictions.append(row)
    return metrics, predictions
