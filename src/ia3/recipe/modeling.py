"""The task object of a recipe run; base model and tokenizer loading itself is the core's, in `ia3.loading`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ia3.recipe.config import DataArgs, ModelArgs
from ia3.tasks import Task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def make_task(args: ModelArgs, data: DataArgs, tokenizer: PreTrainedTokenizerBase) -> Task:
    """The task object of a run: its kind, bound to the tokenizer, with the run's prompt settings."""
    try:
        return args.task_class(tokenizer, prompt=data.prompt, chat_template=data.chat_template)
    except ValueError as err:
        raise ValueError(f"{err} (model {args.name!r}, task {args.task!r})") from None
