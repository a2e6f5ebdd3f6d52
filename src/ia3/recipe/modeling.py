"""Loading the base model, its tokenizer and the task object for a recipe run (or the server)."""

from __future__ import annotations

import torch

from ia3.base_models import BaseModelRef, load_pretrained, resolve_base_model
from ia3.recipe.config import DataArgs, ModelArgs
from ia3.tasks import Task, get_task


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
    """The base model for `task` (a `.gguf` base is dequantised by transformers)."""
    import transformers

    task = get_task(task) if isinstance(task, str) else task
    kwargs = {"revision": args.revision, "trust_remote_code": args.trust_remote_code, **task.model_kwargs(label_names)}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = load_pretrained(getattr(transformers, task.auto_class), model_ref(args), **kwargs)
    task.prepare_model(model)
    return model
