"""`train`: fine-tune an (IA)^3 adapter on a labelled text dataset, with metrics, checkpoints and resume.

One explicit loop: accelerate handles the device, mixed precision and processes (`accelerate launch -m ia3 train`:
one process, DDP, or FSDP2 with `ia3.recipe.sharding`). `train` reads top to bottom: the set-up (data, model,
optimizer, sharding, resume) is in named functions before the loop, each epoch is `_train_epoch` (one optimizer step:
`_optimizer_step`), and checkpointing and validation are `_checkpoint` and `_validate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ia3 import IA3Config, PeftModel, get_peft_model
from ia3.base_models import portable_reference
from ia3.loading import load_base_model, load_tokenizer
from ia3.recipe import sharding
from ia3.recipe.checkpoint import (
    find_checkpoint,
    load_adapter_weights,
    load_trainer_state,
    prune_checkpoints,
    save_checkpoint,
)
from ia3.recipe.config import RecipeConfig, TrainArgs
from ia3.recipe.data import Examples, train_val_split
from ia3.recipe.evaluate import evaluate
from ia3.recipe.features import Encoded, encode, epoch_batches, train_batch
from ia3.recipe.losses import tfew_losses
from ia3.recipe.modeling import make_task
from ia3.serialization import atomic_write_text
from ia3.settings import RECIPE_FILE
from ia3.tasks import Task

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch import nn

__all__ = ["FINAL_METRICS", "LOG_FILE", "RECIPE_FILE", "train"]

LOG_FILE = "metrics.jsonl"
FINAL_METRICS = "metrics.json"


def train(cfg: RecipeConfig, resume: str | bool = False, progress: bool = True) -> dict[str, Any]:
    """Train per `cfg`; writes the adapter, `recipe.yaml`, `metrics.jsonl`, `metrics.json`, plots and checkpoints
    into `cfg.output_dir` (the main process writes; with several processes, all of them train).

    Args:
        cfg: the run's settings.
        resume: True (the output folder's latest checkpoint), a checkpoint path, or False (a fresh run).
        progress: print progress bars, per-epoch lines and (`train.show_examples`) examples.

    Returns:
        The final metrics, as `metrics.json` holds them: the last epoch's record, `label_names`,
        `seconds_per_epoch`, and `zero_shot` / `fsdp` when measured. Every process returns them (the evaluation runs
        on every process); `train_seconds` and `seconds_per_epoch` are that process's own timings.

    Raises:
        ValueError: a launch this loop cannot run (DeepSpeed, FSDP version 1, ...), checked before anything is
            loaded, or a batch size the processes do not divide.
        FileNotFoundError: `resume` finds no checkpoint.
        RuntimeError: the checkpoint resumed from is already at the last epoch.
    """
    accelerator = _accelerator(cfg)
    fsdp = _launch_kind(accelerator)
    torch.manual_seed(cfg.train.seed)
    data = _load_data(cfg)
    run, checkpoint = _set_up(cfg, accelerator, fsdp, data, resume, progress)
    state = _restore_state(run, checkpoint)
    _write_start_files(run, data.label_names, state.history)
    zero_shot = _zero_shot(run, data, state)

    for epoch in range(state.epoch, cfg.train.epochs):
        record = _train_epoch(run, data.train, state, epoch)
        if len(data.val):
            record.update(_validate(run, data))
        state.history.append(record)
        _log_epoch(run, record)
        _checkpoint(run, state, epoch + 1, 0)

    if not state.history:
        raise RuntimeError("Nothing to train: the checkpoint is already at the last epoch")
    return _finish(run, data, state, zero_shot)


# -- set-up --------------------------------------------------------------------------------------------------------
@dataclass
class _Data:
    """The run's examples, encoded for its task (`train.task` is the task bound to the tokenizer)."""

    train: Encoded
    val: Encoded
    val_examples: Examples
    label_names: list[str]


@dataclass
class _Run:
    """What the loop works with, set up once before it."""

    cfg: RecipeConfig
    accelerator: Accelerator
    fsdp: str | None  # None, "accelerate" (GPUs) or "cpu" (gloo processes); see `sharding.fsdp_launch`
    model: nn.Module  # as `accelerator.prepare` wrapped it (DDP, FSDP2), or the PeftModel itself
    peft_model: PeftModel  # the model unwrapped: evaluation, saving
    optimizer: Any  # accelerate's wrapper of `torch_optimizer`, or it
    torch_optimizer: torch.optim.Optimizer  # what checkpoints save and load
    scheduler: Any
    held: dict[str, Any] | None  # sharded: what each process holds (`sharding.describe`), for metrics.json
    progress: bool

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def main(self) -> bool:
        """This process writes the files (and prints)."""
        return bool(self.accelerator.is_main_process)

    @property
    def printing(self) -> bool:
        return self.main and self.progress

    @property
    def sharded(self) -> bool:
        return self.fsdp is not None

    @property
    def world(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


@dataclass
class _State:
    """Where training stands: what a checkpoint saves and `--resume` restores."""

    epoch: int = 0  # the epoch to run next
    batches_done: int = 0  # of that epoch, already trained (a mid-epoch checkpoint): skipped
    step: int = 0  # optimizer steps so far
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch


def _launch_kind(accelerator: Accelerator) -> str | None:
    """The FSDP launch (None, "accelerate" or "cpu"); refuses, before any work is done, launches this loop cannot
    run."""
    if accelerator.distributed_type == "DEEPSPEED":
        # ZeRO optimizers: this loop would write optimizer checkpoints in a format it cannot read back
        raise ValueError(
            "ia3 train runs on one process, with DDP or with FSDP, not under DEEPSPEED: launch with "
            "configs/accelerate/ddp.yaml, or configs/accelerate/fsdp.yaml for a base model that does not fit one "
            "device. (IA)^3's vectors and optimizer state are tiny, so ZeRO-2 saves nothing over DDP; for ZeRO-3, "
            "see configs/accelerate/README.md."
        )
    return sharding.fsdp_launch(accelerator)


def _load_data(cfg: RecipeConfig) -> _Data:
    """The examples, split and capped per `cfg`, encoded for the run's task (which loads the tokenizer)."""
    d, m, t = cfg.data, cfg.model, cfg.train
    examples = d.load_examples()
    train_ex, val_ex = train_val_split(examples, d.val_split, t.seed)
    if t.max_train_samples:
        train_ex = train_ex.subset(list(range(min(t.max_train_samples, len(train_ex)))))
    if t.max_eval_samples:
        val_ex = val_ex.subset(list(range(min(t.max_eval_samples, len(val_ex)))))
    task = make_task(m, d, load_tokenizer(m.source, m.task_class))
    return _Data(
        train=encode(task, train_ex, d.max_length, d.label_length),
        val=encode(task, val_ex, d.max_length, d.label_length),
        val_examples=val_ex,
        label_names=examples.label_names,
    )


def _peft_model(cfg: RecipeConfig, task: Task, label_names: list[str], printing: bool) -> PeftModel:
    """The base model with fresh (IA)^3 vectors on the configured targets."""
    m = cfg.model
    peft_config = IA3Config(
        task_type=task.peft_task_type,
        target_modules=m.target_modules,
        feedforward_modules=m.feedforward_modules,
        revision=m.revision,
        base_model_name_or_path=portable_reference(m.source.reference()),
    )
    model = get_peft_model(load_base_model(m.source, m.task_class, label_names), peft_config)
    if printing:
        model.print_trainable_parameters()
    return model


def _optimizer(model: nn.Module, t: TrainArgs, train_examples: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters and its schedule: linear warmup, then linear decay to 0."""
    steps_per_epoch = math.ceil(math.ceil(train_examples / t.batch_size) / t.grad_accum)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return optimizer, linear_schedule(optimizer, t.warmup_steps, steps_per_epoch * t.epochs)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate grows linearly from 0 over `warmup` steps, then falls linearly to 0 at step `total`.

    The same factors as transformers' `get_linear_schedule_with_warmup` (so runs and checkpoints match earlier
    ones), written here because importing that function loads transformers' trainer, and with it every optional
    integration installed (peft, bitsandbytes), whose import-time notices a plain run must not print."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_linear_factor, warmup=warmup, total=total))


def _linear_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def _set_up(
    cfg: RecipeConfig, accelerator: Accelerator, fsdp: str | None, data: _Data, resume: str | bool, progress: bool
) -> tuple[_Run, Path | None]:
    """The model (resumed weights loaded, sharded), its optimizer and schedule; and the checkpoint to resume from."""
    main, out, world = accelerator.is_main_process, Path(cfg.output_dir), accelerator.num_processes
    model = _peft_model(cfg, data.train.task, data.label_names, printing=main and progress)
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by the {world} processes")
    folder = None
    if resume:
        folder = find_checkpoint(out if resume is True else Path(resume))
        if folder is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {out if resume is True else resume}")
        load_adapter_weights(folder, model)  # whole tensors, before any sharding
    if fsdp == "cpu":
        sharding.shard(model)  # replaces the parameters: before the optimizer is built over them
    optimizer, scheduler = _optimizer(model, cfg.train, len(data.train))
    prepared: Any = model
    if fsdp != "cpu":  # one process, DDP, or accelerate's FSDP2 (which shards here and re-points the optimizer)
        prepared, optimizer = accelerator.prepare(model, optimizer)
    peft_model = accelerator.unwrap_model(prepared)
    held = sharding.describe(peft_model, f"fsdp-{fsdp}", world) if fsdp is not None else None
    if held and main and progress:
        print(
            f"FSDP ({fsdp}): {world} processes, each holding {held['held_fraction']:.1%} of the model's parameters "
            "between forward passes"
        )
    run = _Run(
        cfg=cfg,
        accelerator=accelerator,
        fsdp=fsdp,
        model=prepared,
        peft_model=peft_model,
        optimizer=optimizer,
        torch_optimizer=optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
        scheduler=scheduler,
        held=held,
        progress=progress,
    )
    return run, folder


def _restore_state(run: _Run, folder: Path | None) -> _State:
    """A fresh run's state, or the checkpoint's (loading its optimizer and schedule state too)."""
    if folder is None:
        return _State()
    saved = load_trainer_state(folder, run.torch_optimizer, run.scheduler)
    state = _State(saved["epoch"], saved["batches_done"], saved["step"], saved["history"])
    if run.printing:
        print(f"resumed from {folder} (epoch {state.epoch}, step {state.step})")
    return state


def _write_start_files(run: _Run, label_names: list[str], history: list[dict[str, Any]]) -> None:
    """The main process writes the run's `recipe.yaml` (with the label names found) and starts its log."""
    if not run.main:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    cfg = run.cfg
    resolved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, label_names=label_names))
    resolved.save(run.out / RECIPE_FILE)
    # a fresh run starts an empty log; a resumed one restarts it from the checkpoint's history, which drops the
    # lines of epochs logged after that checkpoint (a crash between logging an epoch and checkpointing it)
    atomic_write_text(run.out / LOG_FILE, "".join(json.dumps(h) + "\n" for h in history))


# -- checkpoints and validation ------------------------------------------------------------------------------------
def _checkpoint(run: _Run, state: _State, epoch: int, batches_done: int) -> None:
    """Save a checkpoint at `state.step`: resuming from it starts `epoch` after its first `batches_done` batches."""
    # sharded: every process takes part in gathering the vectors and their optimizer state, the main one writes
    adapter_state = sharding.adapter_state(run.peft_model, run.sharded)
    optimizer_state = sharding.optimizer_state(run.torch_optimizer) if run.sharded else None
    if run.main:
        save_checkpoint(
            run.out / "checkpoints",
            state.step,
            run.peft_model,
            run.torch_optimizer,
            run.scheduler,
            {"epoch": epoch, "batches_done": batches_done, "history": state.history},
            adapter_state=adapter_state,
            optimizer_state=optimizer_state,
        )
    run.accelerator.wait_for_everyone()


def _validate(run: _Run, data: _Data) -> dict[str, Any]:
    """The evaluation part of a history record, on the validation split (every process evaluates it whole)."""
    t = run.cfg.train
    with sharding.whole_root(run.peft_model):
        metrics, _ = evaluate(
            run.peft_model,
            data.val,
            data.label_names,
            batch_size=t.eval_batch_size,
            label_length=run.cfg.data.label_length,
            generation=t.generation_eval,
            device=run.device,
            progress=run.printing,
        )
    return _eval_record(metrics)


def _zero_shot(run: _Run, data: _Data, state: _State) -> dict[str, Any] | None:
    """With `train.eval_before_training`, a fresh run's validation of the base model alone (adapter off)."""
    fresh = state.epoch == 0 and state.batches_done == 0
    if not (run.cfg.train.eval_before_training and len(data.val) and fresh):
        return None
    with run.peft_model.disable_adapter():
        zero_shot = _validate(run, data)
    if run.printing:
        print("before training (the base model alone):" + _eval_line(zero_shot))
    return zero_shot


# -- the loop ------------------------------------------------------------------------------------------------------
def _train_epoch(run: _Run, enc: Encoded, state: _State, epoch: int) -> dict[str, Any]:
    """One epoch (the rest of it, when resumed mid-epoch), checkpointing every `train.checkpoint_every` steps;
    returns its history record, without the evaluation."""
    t = run.cfg.train
    run.model.train()
    batches = epoch_batches(enc.lengths(), t.batch_size, t.seed, epoch, t.group_by_length)
    start = time.perf_counter()
    loss_sum, loss_units = 0.0, 0
    bar = tqdm(
        total=len(batches), initial=state.batches_done, desc=f"epoch {epoch}", disable=not run.printing, leave=False
    )
    group: list[list[int]] = []
    for b, indices in enumerate(batches):
        if b < state.batches_done:
            continue
        group.append(indices)
        last = b == len(batches) - 1
        if len(group) < t.grad_accum and not last:
            bar.update(1)
            continue
        summed, units = _optimizer_step(run, enc, group)
        loss_sum += summed
        loss_units += units
        state.step += 1
        group = []
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum / max(loss_units, 1):.4f}")
        if t.checkpoint_every and state.step % t.checkpoint_every == 0 and not last:
            _checkpoint(run, state, epoch, b + 1)
    bar.close()
    state.batches_done = 0
    train_loss = loss_sum / max(loss_units, 1)
    return {
        "epoch": epoch,
        "step": state.step,
        "train_loss": train_loss,
        "train_ppl": math.exp(min(train_loss, 50)),
        "train_seconds": time.perf_counter() - start,
    }


def _optimizer_step(run: _Run, enc: Encoded, group: list[list[int]]) -> tuple[float, int]:
    """One optimizer step over the global batches of `group` (gradient accumulation), each process taking its
    rows of each batch; returns (the step's summed loss over all processes, the units it averages over)."""
    units = sum(_units(enc, g, run.cfg) for g in group)  # the whole step's, on every process
    loss_sum = 0.0
    for i, global_batch in enumerate(group):
        local = global_batch[run.rank :: run.world]
        # gradients are reduced across processes once per step, on its last batch
        sync = run.accelerator.no_sync(run.model) if i < len(group) - 1 else contextlib.nullcontext()
        with sync, run.accelerator.autocast():
            # a process with no rows of a small last batch still runs a forward and backward (of one row, weighted
            # 0): DDP's and FSDP's gradient reductions need every process
            summed = _loss_sum(run.model, enc, local or global_batch[:1], run.cfg, run.device)
            if not local:
                summed = summed * 0.0
            # DDP and FSDP average gradients over processes: scale by `world` so the step's gradient is the
            # gradient of (sum of all processes' losses) / units, whatever the split
            run.accelerator.backward(summed * run.world / units)
        if run.world > 1:
            loss_sum += float(run.accelerator.reduce(summed.detach(), reduction="sum"))
        else:
            loss_sum += float(summed.detach())
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum, units


def _log_epoch(run: _Run, record: dict[str, Any]) -> None:
    """The main process appends the epoch's record to the log and prints it."""
    if not run.main:
        return
    _log(run.out / LOG_FILE, record)
    if run.progress:
        print(
            f"epoch={record['epoch']}: train_ppl={record['train_ppl']:.4f} "
            f"train_epoch_loss={record['train_loss']:.4f}" + _eval_line(record) + f" ({record['train_seconds']:.1f}s)"
        )


# -- the end -------------------------------------------------------------------------------------------------------
def _finish(run: _Run, data: _Data, state: _State, zero_shot: dict[str, Any] | None) -> dict[str, Any]:
    """Save the adapter, show examples, write `metrics.json` and the plots; returns the final metrics."""
    adapter_state = sharding.adapter_state(run.peft_model, run.sharded)  # every process: a collective when sharded
    if run.main:
        run.peft_model.save_pretrained(run.out, state_dict=adapter_state)
        # a run killed between writing its last checkpoint and deleting the oldest, then resumed from that last
        # one, writes no checkpoint that would delete it
        prune_checkpoints(run.out / "checkpoints")
    shown = run.cfg.train.show_examples if run.progress and len(data.val) else 0
    if shown and (run.main or run.sharded):  # the forward passes of a sharded model need every process
        with sharding.whole_root(run.peft_model):
            _show_examples(
                run.peft_model,
                data.val,
                data.val_examples,
                data.label_names,
                shown,
                run.cfg.data.label_length,
                run.device,
                printing=run.main,
            )
    history = state.history
    final = {
        **history[-1],
        "label_names": data.label_names,
        "seconds_per_epoch": sum(h["train_seconds"] for h in history) / len(history),
    }
    if run.held is not None:
        final["fsdp"] = run.held
    if zero_shot is not None:
        final["zero_shot"] = {k: zero_shot[k] for k in ("accuracy", "macro_f1", "generation_accuracy", "eval_loss")}
    if run.main:
        atomic_write_text(run.out / FINAL_METRICS, json.dumps(final, indent=2) + "\n")
        if run.cfg.train.plots:
            from ia3.recipe.plots import save_plots

            save_plots(history, run.out)
    return final


# -- helpers -------------------------------------------------------------------------------------------------------
def _accelerator(cfg: RecipeConfig) -> Accelerator:
    """accelerate's handle on the device, the mixed precision (`train.precision`) and the processes."""
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


def _units(enc: Encoded, indices: list[int], cfg: RecipeConfig) -> int:
    """What the loss of these examples averages over: the task's units (label tokens, or rows), or rows (T-Few)."""
    if cfg.train.loss == "tfew":
        return len(indices)
    return enc.task.loss_units(enc.choice_ids, enc.gold(indices))


def _loss_sum(
    model: nn.Module, enc: Encoded, indices: list[int], cfg: RecipeConfig, device: torch.device
) -> torch.Tensor:
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


def _eval_record(metrics: dict[str, Any]) -> dict[str, Any]:
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


def _eval_line(record: dict[str, Any]) -> str:
    """The evaluation part of an epoch's printed line (empty without one)."""
    if "accuracy" not in record:
        return ""
    gen = record.get("generation_accuracy")
    return (
        f" eval_ppl={record['eval_ppl']:.4f} eval_epoch_loss={record['eval_loss']:.4f} "
        f"accuracy={record['accuracy']:.4f} macro_f1={record['macro_f1']:.4f}"
        + (f" generation_accuracy={gen:.4f}" if gen is not None else "")
    )


def _log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _show_examples(
    model: nn.Module,
    enc: Encoded,
    examples: Examples,
    label_names: list[str],
    count: int,
    label_length: int,
    device: torch.device,
    printing: bool = True,
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
