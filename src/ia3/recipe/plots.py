"""PNG plots of a run: loss curves and the confusion matrix of the last evaluation."""

from __future__ import annotations

from pathlib import Path


def save_plots(history: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ia3.serialization import atomic_write

    written = []
    epochs = [h["epoch"] + 1 for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax.plot(epochs, [h["eval_loss"] for h in history], marker="o", label="eval loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["accuracy"] for h in history], marker="s", color="tab:green", label="eval accuracy")
    ax2.set_ylim(0, 1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    atomic_write(out / "loss.png", lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    written.append(out / "loss.png")

    confusion = history[-1]["confusion"]
    labels, matrix = confusion["labels"], confusion["matrix"]
    has_other = any(row[-1] for row in matrix)
    cols = labels if has_other else labels[:-1]
    data = [row if has_other else row[:-1] for row in matrix]
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2, 1.2 * len(data) + 1.5))
    ax.imshow(data, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(data)), labels[: len(data)])
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for i, row in enumerate(data):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center")
    ax.set_title(f"epoch {history[-1]['epoch'] + 1}: accuracy {history[-1]['accuracy']:.3f}")
    fig.tight_layout()
    atomic_write(out / "confusion_matrix.png", lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    written.append(out / "confusion_matrix.png")
    return written
