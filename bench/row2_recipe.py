"""Row 2: one epoch of the seed recipe (Financial PhraseBank, 100% agreement), peft with the seed's settings vs
`ia3.recipe.train.train` with its defaults, on a small T5 whose word-level tokenizer covers the data.

* peft (the PEFT guide's notebook): every input padded to 128 tokens and every target to 3, pre-tokenised, batch 8,
  shuffled DataLoader, AdamW(lr 8e-3), linear schedule without warm-up.
* ia3: `train(cfg)` with the recipe's defaults for the model (batch 8, AdamW 8e-3 with weight decay 0.01, linear
  schedule, per-batch padding, length grouping), epochs=1 and plots off. (On a GPU the recipe's default precision
  is bf16 autocast, while the seed runs in fp32 as its notebook does.)

The figure is the training loop's time for the epoch (evaluation excluded): peft's loop is timed here, ia3's by the
recipe's own start/stop points (the bench hands `ia3.recipe.train` a clock that records wall and CPU time at
those two points). Both models then get the same evaluation (`ia3.recipe.evaluate.evaluate`, rank classification)
on the same validation split (10%, seed 42): the eval loss of ia3 must be no worse [ratio <= 1.0].

The data is read in place from ../shared/data (never copied). In --quick mode the epoch is cut to the first 600
training examples (both sides; the validation split is whole). Targets: epoch time ratio <= 0.35.

Usage: python bench/row2_recipe.py [--quick | --full]
"""

from __future__ import annotations

import gc
import re
import sys
import tempfile
import time
from pathlib import Path

import common
import torch
from common import DATA, Mode, Result

MAX_LENGTH, LABEL_LENGTH, BATCH, LR, SEED = 128, 3, 8, 8e-3, 42
SPECIAL = ["<pad>", "</s>", "<unk>", "<s>"]


# -- model folder ---------------------------------------------------------------------------------------------------
def phrasebank_tokenizer():
    """A word-level tokenizer whose vocabulary is every word and punctuation mark of the data file (read in place),
    plus the label names, in the style of tests/tiny_dirs.py."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    from ia3.recipe.data import PHRASEBANK_LABELS, decode_text_file, parse_phrasebank

    words = set(PHRASEBANK_LABELS)
    for sentence, _ in parse_phrasebank(decode_text_file(DATA.read_bytes(), str(DATA)), str(DATA)):
        words.update(re.findall(r"\w+|[^\w\s]", sentence))
    vocab = {w: i for i, w in enumerate(SPECIAL + sorted(words - set(SPECIAL)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>"
    )


def make_model_dir(root: Path) -> Path:
    """A T5 of d_model 64 (2+2 layers, random weights, seed 0) with the phrasebank tokenizer, saved to a folder."""
    import transformers as tf

    tok = phrasebank_tokenizer()
    torch.manual_seed(0)
    cfg = tf.T5Config(
        vocab_size=len(tok),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.1,
    )
    path = root / "t5-d64-phrasebank"
    tf.T5ForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def split(cap: int | None):
    """The recipe's split (10% validation, seed 42), the training side cut to its first `cap` examples."""
    from ia3.recipe.data import load_examples, train_val_split

    train_ex, val_ex = train_val_split(load_examples(str(DATA)), 0.1, SEED)
    if cap is not None and cap < len(train_ex):
        train_ex = train_ex.subset(list(range(cap)))
    return train_ex, val_ex


# -- the two sides --------------------------------------------------------------------------------------------------
class _EpochClock:
    """Stands in for the `time` module inside ia3.recipe.train: its `perf_counter()` (the recipe's epoch start and
    stop) also records the CPU time at each reading; everything else is the real `time` module."""

    def __init__(self) -> None:
        self.readings: list[tuple[float, float]] = []

    def __getattr__(self, name: str):
        return getattr(time, name)

    def perf_counter(self) -> float:
        wall = time.perf_counter()
        self.readings.append((wall, time.process_time()))
        return wall

    def epoch(self, reported: float) -> dict[str, float]:
        """The last two readings (the epoch's start and stop); `reported` is the recipe's own figure, to check."""
        if len(self.readings) < 2:
            raise RuntimeError("ia3.recipe.train no longer times its epoch with time.perf_counter(); update row 2")
        (w0, c0), (w1, c1) = self.readings[-2:]
        if abs((w1 - w0) - reported) > 1e-6:
            raise RuntimeError("row 2 read other perf_counter() calls than the recipe's epoch start and stop")
        return {"wall": w1 - w0, "cpu": c1 - c0}


def run_ia3(model_dir: Path, out: Path, cap: int | None) -> dict:
    import ia3.recipe.train as recipe
    from ia3.recipe.config import build_config

    cfg = build_config(
        overrides={
            "output_dir": str(out),
            "model.name": str(model_dir),
            "model.task": "seq2seq",
            "data.dataset": str(DATA),
            "train.epochs": 1,
            "train.plots": False,
        }
    )
    clock = _EpochClock()
    original_time, original_split = recipe.time, recipe.train_val_split
    recipe.time = clock
    if cap is not None:  # the quick epoch: the recipe's own split, training side cut to its first `cap` examples

        def capped(examples, fraction, seed):
            train_ex, val_ex = original_split(examples, fraction, seed)
            return train_ex.subset(list(range(min(cap, len(train_ex))))), val_ex

        recipe.train_val_split = capped
    try:
        metrics = recipe.train(cfg, progress=False)
    finally:
        recipe.time, recipe.train_val_split = original_time, original_split
    return {
        "seconds": clock.epoch(metrics["seconds_per_epoch"]),
        "eval_loss": metrics["eval_loss"],
        "accuracy": metrics["accuracy"],
        "train_loss": metrics["train_loss"],
        "steps": metrics["step"],
    }


def run_peft(model_dir: Path, cap: int | None) -> dict:
    import peft
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        default_data_collator,
        get_linear_schedule_with_warmup,
    )

    from ia3.recipe.evaluate import evaluate
    from ia3.recipe.features import encode
    from ia3.tasks import Seq2SeqTask

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_ex, val_ex = split(cap)
    names = train_ex.label_names
    inputs = tokenizer(
        train_ex.texts, max_length=MAX_LENGTH, padding="max_length", truncation=True, return_tensors="pt"
    )
    labels = tokenizer(
        text_target=[names[y] for y in train_ex.labels],
        max_length=LABEL_LENGTH,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    )["input_ids"]
    labels[labels == tokenizer.pad_token_id] = -100
    rows = [
        {"input_ids": inputs["input_ids"][i], "attention_mask": inputs["attention_mask"][i], "labels": labels[i]}
        for i in range(len(train_ex))
    ]
    torch.manual_seed(SEED)
    loader = DataLoader(rows, shuffle=True, collate_fn=default_data_collator, batch_size=BATCH)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = peft.get_peft_model(
        AutoModelForSeq2SeqLM.from_pretrained(model_dir), peft.IA3Config(task_type="SEQ_2_SEQ_LM")
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=len(loader))
    val_enc = encode(Seq2SeqTask(tokenizer), val_ex, MAX_LENGTH, LABEL_LENGTH)
    before, _ = evaluate(model, val_enc, names, generation=False, progress=False)  # vectors at 1: the base
    model.train()
    wall, cpu = time.perf_counter(), time.process_time()
    total, steps = 0.0, 0
    for batch in loader:
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        total += loss.detach().float()
        steps += 1
    common.sync()
    seconds = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    metrics, _ = evaluate(model, val_enc, names, generation=False, progress=False)
    return {
        "seconds": seconds,
        "eval_loss": metrics["loss"],
        "accuracy": metrics["accuracy"],
        "train_loss": float(total) / max(steps, 1),
        "steps": steps,
        "eval_loss_untrained": before["loss"],
    }


def run(mode: Mode) -> list[Result]:
    if not DATA.is_file():
        raise FileNotFoundError(f"row 2 needs {DATA} (read in place)")
    repeats = mode.recipe_repeats
    runs: dict[str, list[dict]] = {"ia3": [], "peft": []}
    with tempfile.TemporaryDirectory(prefix="ia3-bench-recipe-") as tmp:
        root = Path(tmp)
        model_dir = make_model_dir(root)
        for r in range(repeats):  # interleaved: ia3, peft, then peft, ia3, ...
            for side in ("ia3", "peft") if r % 2 == 0 else ("peft", "ia3"):
                gc.collect()
                if side == "ia3":
                    runs[side].append(run_ia3(model_dir, root / f"ia3-{r}", mode.recipe_cap))
                else:
                    runs[side].append(run_peft(model_dir, mode.recipe_cap))
                last = runs[side][-1]
                print(
                    f"  row 2 {side}: epoch {last['seconds']['wall']:.1f} s wall, {last['seconds']['cpu']:.1f} s "
                    f"cpu, eval loss {last['eval_loss']:.4f}, accuracy {last['accuracy']:.3f}",
                    flush=True,
                )
    clock = common.CLOCK["name"]
    secs = {side: common.median([x["seconds"][clock] for x in v]) for side, v in runs.items()}
    loss = {side: common.median([x["eval_loss"] for x in v]) for side, v in runs.items()}
    untrained = runs["peft"][0]["eval_loss_untrained"]
    n_train = len(split(mode.recipe_cap)[0])
    scope = f"quick: first {n_train} training examples" if mode.recipe_cap else f"whole epoch, {n_train} examples"
    extra = {
        "clock": clock,
        "runs": runs,
        "training_examples": n_train,
        "capped": bool(mode.recipe_cap),
        "model": "T5 d_model 64, 2+2 layers, word-level phrasebank tokenizer",
        "repeats": repeats,
    }
    return [
        Result("2", f"recipe epoch, T5-d64 phrasebank ({scope})", secs["ia3"], secs["peft"], "s", "peft", 0.35, extra),
        Result(
            "2",
            f"recipe eval loss, same validation split (untrained: {untrained:.3f})",
            loss["ia3"],
            loss["peft"],
            "nll",
            "peft",
            1.0,
            {"accuracy": {s: [x["accuracy"] for x in v] for s, v in runs.items()}, "untrained": untrained},
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    return common.row_main("2", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    sys.exit(main())
