"""`train`: fine-tune an (IA)^3 adapter on a labelled text dataset, with metrics, checkpoints and resume.

One explicit loop: accelerate handles the device, mixed precision and processes (`accelerate launch -m ia3 train`:
one process, DDP, or FSDP2 with `ia3.recipe.sharding`); everything else is readable top to bottom.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ia3 import IA3Config, get_peft_model
from ia3.base_models import portable_reference
from ia3.recipe import sharding
from ia3.recipe.checkpoint import find_checkpoint, load_adapter_weights, load_trainer_state, save_checkpoint
from ia3.recipe.config import RecipeConfig
from ia3.recipe.data import load_examples, train_val_split
from ia3.recipe.evaluate import evaluate
from ia3.recipe.features import encode, epoch_batches, train_batch
from ia3.recipe.losses import tfew_losses
from ia3.recipe.modeling import load_base_model, load_tokenizer, make_task, model_ref
from ia3.serialization import atomic_write_text

RECIPE_FILE = "recipe.yaml"
LOG_FILE = "metrics.jsonl"
FINAL_METRICS = "metrics.json"


def _accelerator(cfg: RecipeConfig):
    from accelerate import Accelerator

    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    # Several processes (`accelerate launch --multi_gpu`, `torchrun`) on a machine without an accelerator: unless
    # told to use the CPU, accelerate makes each one a lone process (all training on everything, all writing the
    # output files); with cpu=True they train together over gloo.
    api = getattr(torch, "accelerator", None)
    no_device = not api.is_available() if hasattr(api, "is_available") else not torch.cuda.is_available()
    cpu = no_device and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=cpu, mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision])


def _units(enc, indices: list[int], cfg: RecipeConfig) -> int:
    """What the loss of these examples averages over: the task's units (label tokens, or rows), or rows (T-Few)."""
    if cfg.train.loss == "tfew":
        return len(indices)
    return enc.task.loss_units(enc.choice_ids, enc.gold(indices))


def _loss_sum(model, enc, indices: list[int], cfg: RecipeConfig, device) -> torch.Tensor:
    """Summed training loss of these examples (divided later by the units of the whole optimizer step, across
    processes and accumulation steps, so that any split of a global batch gives the same gradient)."""
    task = enc.task
    if cfg.train.loss == "tfew":
        lp, mask = task.choice_logprobs(model, enc.inputs(indices), enc.choice_ids, device)
        gold = torch.tensor(enc.gold(indices), device=lp.device)
        return tfew_losses(lp, mask, gold)["total"] * len(indices)
    return task.loss_sum(model, _to_device(train_batch(enc, indices), device))


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Pinned, asynchronous copies to a GPU (pinning buys nothing on the CPU, so it is skipped there)."""
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def _eval_record(metrics: dict) -> dict:
    """The evaluation part of a history record."""
    return {
        "eval_loss": metrics["loss"],
        "eval_ppl": metrics["ppl"],
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "generation_accuracy": metrics.get("generation_accuracy"),
        "per_class": metrics["per_class"],
        "confusion": metrics["confusion"],
    }


def _eval_line(record: dict) -> str:
    if "accuracy" not in record:
        return ""
    gen = record.get("generation_accuracy")
    return (
        f" eval_ppl={record['eval_ppl']:.4f} eval_epoch_loss={record['eval_loss']:.4f} "
        f"accuracy={record['accuracy']:.4f} macro_f1={record['macro_f1']:.4f}"
        + (f" generation_accuracy={gen:.4f}" if gen is not None else "")
    )


def _log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def train(cfg: RecipeConfig, resume: str | bool = False, progress: bool = True) -> dict:
    """Train per `cfg`; writes the adapter, `recipe.yaml`, `metrics.jsonl`, `metrics.json`, plots and checkpoints
    into `cfg.output_dir`. `resume`: True (the output dir's latest checkpoint) or a checkpoint path.

    Returns the final evaluation metrics (plus `seconds_per_epoch`).
    """
    accelerator = _accelerator(cfg)
    if accelerator.distributed_type == "DEEPSPEED":
        # ZeRO optimizers: this loop would write optimizer checkpoints in a format it cannot read back. Refuse
        # before any work is done.
        raise ValueError(
            "ia3 train runs on one process, with DDP or with FSDP, not under DEEPSPEED: launch with "
            "configs/accelerate/ddp.yaml, or configs/accelerate/fsdp.yaml for a base model that does not fit one "
            "device. (IA)^3's vectors and optimizer state are tiny, so ZeRO-2 saves nothing over DDP; for ZeRO-3, "
            "see configs/accelerate/README.md."
        )
    fsdp = sharding.fsdp_launch(accelerator)  # None, "accelerate" (GPUs) or "cpu" (gloo processes)
    main = accelerator.is_main_process
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.train.seed)

    # -- data --------------------------------------------------------------------------------------------------
    d, m, t = cfg.data, cfg.model, cfg.train
    examples = load_examples(
        d.dataset,
        subset=d.subset,
        split=d.split,
        text_column=d.text_column,
        label_column=d.label_column,
        label_names=d.label_names,
    )
    train_ex, val_ex = train_val_split(examples, d.val_split, t.seed)
    if t.max_train_samples:
        train_ex = train_ex.subset(list(range(min(t.max_train_samples, len(train_ex)))))
    if t.max_eval_samples:
        val_ex = val_ex.subset(list(range(min(t.max_eval_samples, len(val_ex)))))
    label_names = examples.label_names
    task = make_task(m, d, load_tokenizer(m, m.task))
    train_enc = encode(task, train_ex, d.max_length, d.label_length)
    val_enc = encode(task, val_ex, d.max_length, d.label_length)

    # -- model -------------------------------------------------------------------------------------------------
    base = load_base_model(m, m.task, label_names)
    peft_config = IA3Config(
        task_type=task.peft_task_type,
        target_modules=m.target_modules,
        feedforward_modules=m.feedforward_modules,
        revision=m.revision,
        base_model_name_or_path=portable_reference(model_ref(m)),
    )
    model = get_peft_model(base, peft_config)
    if main and progress:
        model.print_trainable_parameters()
    world = accelerator.num_processes
    if t.batch_size % world:
        raise ValueError(f"train.batch_size={t.batch_size} must be divisible by the {world} processes")
    folder = None
    if resume:
        folder = find_checkpoint(out if resume is True else Path(resume))
        if folder is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {out if resume is True else resume}")
        load_adapter_weights(folder, model)  # whole tensors, before any sharding
    if fsdp == "cpu":
        sharding.shard(model)  # replaces the parameters: before the optimizer is built over them
    steps_per_epoch = math.ceil(math.ceil(len(train_enc) / t.batch_size) / t.grad_accum)
    total_steps = steps_per_epoch * t.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, t.warmup_steps, total_steps)
    if fsdp != "cpu":  # one process, DDP, or accelerate's FSDP2 (which shards here and re-points the optimizer)
        model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    peft_model = accelerator.unwrap_model(model)
    sharded = fsdp is not None
    torch_optimizer = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    held = sharding.describe(peft_model, f"fsdp-{fsdp}", world) if sharded else None
    if held and main and progress:
        print(
            f"FSDP ({fsdp}): {world} processes, each holding {held['held_fraction']:.1%} of the model's parameters "
            "between forward passes"
        )

    # -- resume ------------------------------------------------------------------------------------------------
    start_epoch, skip_batches, step, history = 0, 0, 0, []
    if folder is not None:
        saved = load_trainer_state(folder, torch_optimizer, scheduler)
        start_epoch, skip_batches, step, history = (
            saved["epoch"],
            saved["batches_done"],
            saved["step"],
            saved["history"],
        )
        if main and progress:
            print(f"resumed from {folder} (epoch {start_epoch}, step {step})")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        resolved = RecipeConfig(
            output_dir=cfg.output_dir, model=m, data=type(d)(**{**d.__dict__, "label_names": label_names}), train=t
        )
        resolved.save(out / RECIPE_FILE)
        # a fresh run starts an empty log; a resumed one restarts it from the checkpoint's history, which drops the
        # lines of epochs logged after that checkpoint (a crash between logging an epoch and checkpointing it)
        atomic_write_text(out / LOG_FILE, "".join(json.dumps(h) + "\n" for h in history))

    def checkpoint(epoch: int, batches_done: int) -> None:
        # sharded: every process takes part in gathering the vectors and their optimizer state, the main one writes
        adapter_state = sharding.adapter_state(peft_model, sharded)
        optimizer_state = sharding.optimizer_state(torch_optimizer) if sharded else None
        if main:
            save_checkpoint(
                out / "checkpoints",
                step,
                peft_model,
                torch_optimizer,
                scheduler,
                {"epoch": epoch, "batches_done": batches_done, "history": history},
                adapter_state=adapter_state,
                optimizer_state=optimizer_state,
            )
        accelerator.wait_for_everyone()

    def validate() -> dict:
        """The evaluation part of a history record, on the validation split."""
        with sharding.whole_root(peft_model):
            metrics, _ = evaluate(
                peft_model,
                val_enc,
                label_names,
                batch_size=t.eval_batch_size,
                label_length=d.label_length,
                generation=t.generation_eval,
                device=device,
                progress=main and progress,
            )
        return _eval_record(metrics)

    # -- zero-shot ---------------------------------------------------------------------------------------------
    zero_shot = None
    if t.eval_before_training and len(val_enc) and start_epoch == 0 and skip_batches == 0:
        with peft_model.disable_adapter():
            zero_shot = validate()
        if main and progress:
            print("before training (the base model alone):" + _eval_line(zero_shot))

    # -- loop --------------------------------------------------------------------------------------------------
    rank = accelerator.process_index
    for epoch in range(start_epoch, t.epochs):
        model.train()
        batches = epoch_batches(train_enc.lengths(), t.batch_size, t.seed, epoch, t.group_by_length)
        start = time.perf_counter()
        loss_sum, loss_units = 0.0, 0
        bar = tqdm(
            total=len(batches),
            initial=skip_batches,
            desc=f"epoch {epoch}",
            disable=not (main and progress),
            leave=False,
        )
        group: list[list[int]] = []
        for b, indices in enumerate(batches):
            if b < skip_batches:
                continue
            group.append(indices)
            last = b == len(batches) - 1
            if len(group) < t.grad_accum and not last:
                bar.update(1)
                continue
            units = sum(_units(train_enc, g, cfg) for g in group)  # the whole step's, on every process
            for i, global_batch in enumerate(group):
                local = global_batch[rank::world]
                ctx = accelerator.no_sync(model) if i < len(group) - 1 else _null()
                with ctx, accelerator.autocast():
                    # a process with no rows of a small last batch still runs a forward and backward (of one row,
                    # weighted 0): DDP's and FSDP's gradient reductions need every process
                    summed = _loss_sum(model, train_enc, local or global_batch[:1], cfg, device)
                    if not local:
                        summed = summed * 0.0
                    # DDP and FSDP average gradients over processes: scale by `world` so the step's gradient is
                    # the gradient of (sum of all processes' losses) / units, whatever the split
                    accelerator.backward(summed * world / units)
                loss_sum += (
                    float(accelerator.reduce(summed.detach(), reduction="sum")) if world > 1 else float(summed.detach())
                )
            loss_units += units
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            group = []
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / max(loss_units, 1):.4f}")
            if t.checkpoint_every and step % t.checkpoint_every == 0 and not last:
                checkpoint(epoch, b + 1)
        bar.close()
        skip_batches = 0
        train_seconds = time.perf_counter() - start
        train_loss = loss_sum / max(loss_units, 1)
        record = {
            "epoch": epoch,
            "step": step,
            "train_loss": train_loss,
            "train_ppl": math.exp(min(train_loss, 50)),
            "train_seconds": train_seconds,
        }
        if len(val_enc):
            record.update(validate())
        history.append(record)
        if main:
            _log(out / LOG_FILE, record)
            if progress:
                print(
                    f"epoch={epoch}: train_ppl={record['train_ppl']:.4f} train_epoch_loss={train_loss:.4f}"
                    + _eval_line(record)
                    + f" ({train_seconds:.1f}s)"
                )
        checkpoint(epoch + 1, 0)

    if not history:
        raise RuntimeError("Nothing to train: the checkpoint is already at the last epoch")
    adapter_state = sharding.adapter_state(peft_model, sharded)  # every process: a collective when sharded
    if main:
        peft_model.save_pretrained(out, state_dict=adapter_state)
    shown = t.show_examples if progress and len(val_enc) else 0
    if shown and (main or sharded):  # the forward passes of a sharded model need every process
        with sharding.whole_root(peft_model):
            _show_examples(peft_model, val_enc, val_ex, label_names, shown, d.label_length, device, printing=main)
    if main:
        final = {
            **history[-1],
            "label_names": label_names,
            "seconds_per_epoch": sum(h["train_seconds"] for h in history) / len(history),
        }
        if held is not None:
            final["fsdp"] = held
        if zero_shot is not None:
            final["zero_shot"] = {k: zero_shot[k] for k in ("accuracy", "macro_f1", "generation_accuracy", "eval_loss")}
        atomic_write_text(out / FINAL_METRICS, json.dumps(final, indent=2) + "\n")
        if t.plots:
            from ia3.recipe.plots import save_plots

            save_plots(history, out)
        return final
    return {}


def _show_examples(
    model, enc, examples, label_names: list[str], count: int, label_length: int, device, printing: bool = True
) -> None:
    """Print a few validation sentences with their gold label and the trained model's predictions (`printing`
    False: only take part in the forward passes, as the other processes of a sharded model must)."""
    from ia3.recipe.evaluate import generate_labels, score_batch

    by_class: dict[int, list[int]] = {}
    for i, gold in enumerate(enc.labels):
        by_class.setdefault(gold, []).append(i)
    # round-robin over the gold classes, so that every class shows
    indices = [i for row in itertools.zip_longest(*by_class.values()) for i in row if i is not None][:count]
    model.eval()
    ranked, _, _, _ = score_batch(model, enc, indices, device)
    generated = generate_labels(model, enc, indices, label_length, device) if enc.task.generates else None
    if not printing:
        return
    print("examples (gold -> rank classification" + (", generated" if generated else "") + "):")
    for n, i in enumerate(indices):
        text = examples.texts[i] if len(examples.texts[i]) <= 100 else examples.texts[i][:97] + "..."
        shown = f"  {label_names[examples.labels[i]]:>10} -> {label_names[ranked[n]]}"
        if generated is not None:
            shown += f", {generated[n].strip()!r}"
        print(f"{shown}  | {text}")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
