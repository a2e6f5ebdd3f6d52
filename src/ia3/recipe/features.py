"""Tokenise a dataset once, and cut it into batches (length-grouped, with per-batch padding).

What a text and a label become as tokens is the task's business (`ia3.tasks`); this module applies it to a whole
dataset and turns the recipe's length settings into the task's limits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ia3.recipe.data import DataError, Examples
from ia3.tasks import LabelLengthError, Task


@dataclass
class Encoded:
    """Token ids of every example's input and of every label's choice sequence, for `task`."""

    task: Task
    input_ids: list[list[int]]
    labels: list[int]
    choice_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def inputs(self, indices: list[int]) -> list[list[int]]:
        return [self.input_ids[i] for i in indices]

    def gold(self, indices: list[int]) -> list[int]:
        return [self.labels[i] for i in indices]


def encode_choices(task: Task, label_names: list[str], label_length: int) -> list[list[int]]:
    """The task's choice tokens of each label; a label longer than `label_length` is a DataError naming the flag."""
    try:
        return task.encode_choices(label_names, label_length)
    except LabelLengthError as err:
        raise DataError(
            f"Label {err.label!r} is {len(err.tokens)} tokens long ({err.tokens}) but data.label_length "
            f"is {err.limit}: raise --data.label_length or use shorter label names"
        ) from None


def encode_texts(task: Task, texts: list[str], max_length: int, choices: list[list[int]]) -> list[list[int]]:
    """The task's input tokens of each text; a causal input leaves room for the longest choice, so that prompt +
    label fit `max_length`. A limit that leaves no room for the text is a DataError naming the flag."""
    if not texts:  # e.g. the validation split of `--data.val_split 0` (tokenizers refuse an empty batch)
        return []
    try:
        return task.encode(texts, max_length, max((len(c) for c in choices), default=0))
    except ValueError as err:
        raise DataError(f"{err} (--data.max_length is {max_length})") from None


def encode(task: Task, examples: Examples, max_length: int, label_length: int) -> Encoded:
    """Tokenise all examples once (no padding: batches pad to their own longest row)."""
    choices = encode_choices(task, examples.label_names, label_length)
    return Encoded(task, encode_texts(task, examples.texts, max_length, choices), list(examples.labels), choices)


def train_batch(enc: Encoded, indices: list[int]) -> dict[str, torch.Tensor]:
    """Model inputs (with `labels`) for the training loss of these examples."""
    return enc.task.train_batch(enc.inputs(indices), enc.choice_ids, enc.gold(indices))


def epoch_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool, shuffle: bool = True
) -> list[list[int]]:
    """The batches of one epoch, a pure function of (seed, epoch) so that a resumed run sees the same order.

    With `group_by_length`, shuffled examples are cut into pools of 50 batches, each pool sorted by length and cut
    into batches, and the batches shuffled: rows of a batch have similar lengths, so little is padding.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed * 1_000_003 + epoch)
    if not shuffle:
        order.sort(key=lambda i: -lengths[i])
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(order)
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches
