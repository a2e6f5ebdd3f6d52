"""Using a trained run: load it, evaluate it on a dataset, predict labels for new texts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ia3 import IA3Config, PeftModel
from ia3.loading import default_device, load_base_model, load_tokenizer
from ia3.recipe.config import RecipeConfig, build_config
from ia3.recipe.data import Examples, train_val_split
from ia3.recipe.evaluate import evaluate
from ia3.recipe.features import encode, encode_choices, encode_texts
from ia3.recipe.modeling import make_task
from ia3.settings import RECIPE_FILE, read_settings_file
from ia3.tasks import TASK_OF_PEFT_TYPE, Task


def run_config(adapter_dir: str | Path, overrides: dict[str, Any] | None = None) -> RecipeConfig:
    """The recipe config of a run folder (its `recipe.yaml`), with `overrides`; for an adapter trained elsewhere,
    the model and task come from its `adapter_config.json`."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass the output folder of `ia3 train` or an adapter folder")
    saved_path = folder / RECIPE_FILE
    base: dict[str, Any] = {}
    if saved_path.is_file():
        base = read_settings_file(saved_path)
    else:
        adapter = IA3Config.from_pretrained(folder)
        if adapter.task_type not in TASK_OF_PEFT_TYPE:
            raise ValueError(
                f"{folder}: adapter task_type {adapter.task_type!r} is not a recipe task ({sorted(TASK_OF_PEFT_TYPE)})"
            )
        base = {"model": {"name": adapter.base_model_name_or_path, "task": TASK_OF_PEFT_TYPE[adapter.task_type].name}}
    base["output_dir"] = str(folder)
    return build_config(base=base, overrides=overrides)


def load_run(
    adapter_dir: str | Path, cfg: RecipeConfig, label_names: list[str], device: str | torch.device | None = None
) -> tuple[Task, PeftModel]:
    """(task bound to the run's tokenizer, PeftModel in eval mode on `device`, default `default_device()`) for the
    run in `adapter_dir`."""
    m = cfg.model
    task = make_task(m, cfg.data, load_tokenizer(m.source, m.task_class))
    model = PeftModel.from_pretrained(load_base_model(m.source, m.task_class, label_names), adapter_dir)
    return task, model.to(device or default_device()).eval()


def evaluate_run(
    adapter_dir: str | Path, overrides: dict[str, Any] | None = None, split: str = "val", progress: bool = True
) -> tuple[dict, list[dict], Examples]:
    """Metrics of a trained adapter on its dataset's validation split (or `split="all"`: every example).

    Returns (metrics, predictions, examples) with predictions in `examples` order.
    """
    cfg = run_config(adapter_dir, overrides)
    d = cfg.data
    examples = d.load_examples()
    if split == "val":
        _, examples = train_val_split(examples, d.val_split, cfg.train.seed)
    elif split != "all":
        raise ValueError(f"split must be 'val' or 'all'; got {split!r}")
    task, model = load_run(adapter_dir, cfg, examples.label_names)
    enc = encode(task, examples, d.max_length, d.label_length)
    metrics, predictions = evaluate(
        model,
        enc,
        examples.label_names,
        batch_size=cfg.train.eval_batch_size,
        label_length=d.label_length,
        generation=cfg.train.generation_eval,
        progress=progress,
    )
    for text, row, gold in zip(examples.texts, predictions, examples.labels):
        row["text"] = text
        row["gold"] = examples.label_names[gold]
    return metrics, predictions, examples


@torch.no_grad()
def predict(
    adapter_dir: str | Path,
    texts: list[str],
    mode: str = "rank",
    overrides: dict[str, Any] | None = None,
    batch_size: int = 32,
) -> list[dict]:
    """Labels for `texts`: `mode="rank"` scores every label (the eval accuracy's predictions); `"generate"`
    returns the model's free generation (seq2seq/causal only)."""
    if mode not in ("rank", "generate"):
        raise ValueError(f"mode must be 'rank' or 'generate'; got {mode!r}")
    cfg = run_config(adapter_dir, overrides)
    if mode == "generate" and not cfg.model.task_class.generates:
        raise ValueError("mode 'generate' needs a label-generation task; this run is a classifier (use rank)")
    label_names = cfg.data.label_names
    if not label_names:
        raise ValueError(f"{adapter_dir}: the run's recipe.yaml names no data.label_names; pass --data.label_names")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"Input(s) {bad[:5]} are empty; every input needs some text")
    task, model = load_run(adapter_dir, cfg, label_names)
    d = cfg.data
    choices = encode_choices(task, label_names, d.label_length)
    inputs = encode_texts(task, [t.strip() for t in texts], d.max_length, choices)
    device = next(model.parameters()).device
    out: list[dict] = []
    for start in range(0, len(texts), batch_size):
        indices = list(range(start, min(start + batch_size, len(texts))))
        if mode == "rank":
            scores = task.score(model, [inputs[i] for i in indices], choices, device)[0]
            out += [
                {"text": texts[i], "label": label_names[int(s.argmax())], "scores": dict(zip(label_names, s.tolist()))}
                for i, s in zip(indices, scores)
            ]
        else:
            generated = task.generate(model, [inputs[i] for i in indices], device, max_new_tokens=d.label_length)
            out += [{"text": texts[i], "generated": g.strip()} for i, g in zip(indices, generated)]
    return out
