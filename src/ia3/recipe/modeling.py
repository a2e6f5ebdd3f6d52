"""The task object of a recipe run; base model and tokenizer loading itself is the core's, in `ia3.loading`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ia3 import loading
from ia3.recipe.config import DataArgs, ModelArgs
from ia3.tasks import Task

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase


def make_task(args: ModelArgs, data: DataArgs, tokenizer: PreTrainedTokenizerBase) -> Task:
    """The task object of a run: its kind, bound to the tokenizer, with the run's prompt settings."""
    try:
        return args.task_class(tokenizer, prompt=data.prompt, chat_template=data.chat_template)
    except ValueError as err:
        raise ValueError(f"{err} (model {args.name!r}, task {args.task!r})") from None


# `ia3.serve.engine` still loads through these two until it calls `ia3.loading` with a `ModelSource`; the recipe
# itself does not use them.
def load_tokenizer(args: ModelArgs, task: type[Task]) -> PreTrainedTokenizerBase:
    """`ia3.loading.load_tokenizer` for a `ModelArgs`."""
    return loading.load_tokenizer(args.source, task)


def load_base_model(
    args: ModelArgs, task: type[Task], label_names: list[str], dtype: torch.dtype | None = None
) -> nn.Module:
    """`ia3.loading.load_base_model` for a `ModelArgs`."""
    return loading.load_base_model(args.source, task, label_names, dtype)
