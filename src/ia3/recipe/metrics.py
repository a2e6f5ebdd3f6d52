"""Classification metrics from predicted and gold class ids (a prediction of -1 means "no known label")."""

from __future__ import annotations


def classification_report(golds: list[int], preds: list[int], label_names: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    `confusion[g][p]` counts examples of gold class `g` predicted as `p`; a last column `"<other>"` counts
    predictions that matched no label (generation that produced something else).
    """
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold labels but {len(preds)} predictions")
    n = len(label_names)
    confusion = [[0] * (n + 1) for _ in range(n)]
    for g, p in zip(golds, preds):
        confusion[g][p if 0 <= p < n else n] += 1
    per_class = {}
    f1s = []
    for c, name in enumerate(label_names):
        tp = confusion[c][c]
        predicted = sum(confusion[g][c] for g in range(n))
        support = sum(confusion[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        f1s.append(f1)
    correct = sum(confusion[c][c] for c in range(n))
    return {
        "accuracy": correct / len(golds) if golds else 0.0,
        "macro_f1": sum(f1s) / n if n else 0.0,
        "per_class": per_class,
        "confusion": {"labels": [*label_names, "<other>"], "matrix": confusion},
    }
