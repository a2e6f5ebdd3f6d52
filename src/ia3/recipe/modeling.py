"""Loading the base model, its tokenizer and the task object for a recipe run (or the server)."""

from __future__ import annotations

import torch

from ia3.base_models import BaseModelRef, load_pretrained, resolve_base_model
from ia3.quantization import (
    check_backend,
    keep_4bit_weights_trainable_on_cpu,
    prepare_model_for_kbit_training,
    quantization_config,
)
from ia3.recipe.config import DataArgs, ModelArgs
from ia3.tasks import Task, get_task
from ia3.tuner import TASK_HEADS


def model_ref(args: ModelArgs) -> BaseModelRef:
    """Where `model.name` (and `model.gguf_file`) point."""
    return resolve_base_model(args.name, args.gguf_file)


def load_tokenizer(args: ModelArgs, task: type[Task] | str):
    """The model's tokenizer, prepared for `task` (e.g. a pad token for causal LMs)."""
    from transformers import AutoTokenizer

    task = get_task(task) if isinstance(task, str) else task
    ref = model_ref(args)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            ref.path, revision=args.revision, trust_remote_code=args.trust_remote_code, **ref.from_pretrained_kwargs()
        )
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"Could not load a tokenizer for model {args.name!r}: {err}. The recipe needs the model's tokenizer "
            "files (tokenizer.json or a vocabulary) beside its weights."
        ) from None
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)) + 1:
        raise ValueError(
            f"Model {args.name!r} has no tokenizer: the one loaded knows only its {len(tokenizer)} special tokens. "
            "The recipe needs the model's tokenizer files (tokenizer.json, vocab.txt, spiece.model, ...) beside its "
            "weights; copy them from the model this one was made from."
        )
    task.prepare_tokenizer(tokenizer, args.name)
    return tokenizer


def make_task(args: ModelArgs, data: DataArgs, tokenizer) -> Task:
    """The task object of a run: its kind, bound to the tokenizer, with the run's prompt settings."""
    try:
        return get_task(args.task)(tokenizer, prompt=data.prompt, chat_template=data.chat_template)
    except ValueError as err:
        raise ValueError(f"{err} (model {args.name!r}, task {args.task!r})") from None


def load_base_model(args: ModelArgs, task: type[Task] | str, label_names: list[str], dtype: torch.dtype | None = None):
    """The base model for `task` (a `.gguf` base is dequantised by transformers).

    With `model.quantization` other than `none`, transformers quantises the base while loading it (its
    `BitsAndBytesConfig` / `TorchAoConfig`; see `ia3.quantization`), keeping a classifier head that trains in full
    in full precision, and the model goes through `prepare_model_for_kbit_training` (without gradient
    checkpointing). A missing backend package is reported before anything is loaded.
    """
    import transformers

    task = get_task(task) if isinstance(task, str) else task
    check_backend(args.quantization, "--model.quantization")
    kwargs = {"revision": args.revision, "trust_remote_code": args.trust_remote_code, **task.model_kwargs(label_names)}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if args.quantization != "none":
        heads = TASK_HEADS.get(task.peft_task_type or "")
        kwargs["quantization_config"] = quantization_config(args.quantization, dtype or torch.float32, heads)
        # bitsandbytes and torchao quantise on the device the weights are loaded to: this process's accelerator
        kwargs["device_map"] = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
    model = load_pretrained(getattr(transformers, task.auto_class), model_ref(args), **kwargs)
    if args.quantization != "none":
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_weights_trainable_on_cpu(model)  # evaluation between epochs must not break the next epoch
    task.prepare_model(model)
    return model
