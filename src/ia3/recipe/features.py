"""Tokenise once, batch with per-batch padding, and score label strings (rank classification).

Each task turns a text into model inputs and each class name into a "choice" token sequence:
* seq2seq: encoder input = the text; choice = the label name as decoder target (with EOS);
* causal: input = the prompt (`data.prompt` with the text); choice = `" " + label` + EOS, appended to it;
* cls: input = the text; the label is a class id for the classification head.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ia3.recipe.data import DataError, Examples


@dataclass
class Encoded:
    """Token ids of every example's input and of every label's choice sequence."""

    task: str
    input_ids: list[list[int]]
    labels: list[int]
    choice_ids: list[list[int]]
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def encode_choices(tokenizer, task: str, label_names: list[str], label_length: int) -> list[list[int]]:
    """Token ids of each label name as the model must produce it; errors when one exceeds `label_length`."""
    if task == "cls":
        return [[] for _ in label_names]
    choices = []
    for name in label_names:
        if task == "seq2seq":
            ids = tokenizer(text_target=name, add_special_tokens=True)["input_ids"]
        else:
            ids = tokenizer(" " + name, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) > label_length:
            raise DataError(
                f"Label {name!r} is {len(ids)} tokens long ({tokenizer.convert_ids_to_tokens(ids)}) but "
                f"data.label_length is {label_length}: raise --data.label_length or use shorter label names"
            )
        choices.append(ids)
    return choices


def encode(tokenizer, examples: Examples, task: str, max_length: int, label_length: int, prompt: str) -> Encoded:
    """Tokenise all examples once (no padding; batches pad to their own longest row)."""
    if tokenizer.pad_token_id is None:
        raise DataError("The tokenizer has no pad token and no EOS token to pad with; set tokenizer.pad_token")
    choices = encode_choices(tokenizer, task, examples.label_names, label_length)
    if task == "causal":
        prefix, _, suffix = prompt.partition("{text}")
        prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False) else []
        budget = max_length - len(bos) - len(prefix_ids) - len(suffix_ids) - max(len(c) for c in choices)
        if budget < 1:
            raise DataError(f"data.max_length={max_length} leaves no room for the text after the prompt and label")
        texts = tokenizer(examples.texts, add_special_tokens=False, truncation=True, max_length=budget)["input_ids"]
        inputs = [bos + prefix_ids + ids + suffix_ids for ids in texts]
    else:
        inputs = tokenizer(examples.texts, truncation=True, max_length=max_length)["input_ids"]
    return Encoded(task, inputs, list(examples.labels), choices, tokenizer.pad_token_id)


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


def _pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, width - len(row) :] = torch.tensor(row)
            else:
                out[i, : len(row)] = torch.tensor(row)
    return out


def _mask(rows: list[list[int]], left: bool = False) -> torch.Tensor:
    return _pad([[1] * len(r) for r in rows], 0, left)


def train_batch(enc: Encoded, indices: list[int]) -> dict[str, torch.Tensor]:
    """Model inputs with `labels` for the usual loss: gold label tokens (seq2seq, causal) or class ids (cls)."""
    inputs = [enc.input_ids[i] for i in indices]
    gold = [enc.labels[i] for i in indices]
    if enc.task == "cls":
        return {"input_ids": _pad(inputs, enc.pad_id), "attention_mask": _mask(inputs),
                "labels": torch.tensor(gold)}
    if enc.task == "seq2seq":
        return {"input_ids": _pad(inputs, enc.pad_id), "attention_mask": _mask(inputs),
                "labels": _pad([enc.choice_ids[g] for g in gold], -100)}
    rows = [inp + enc.choice_ids[g] for inp, g in zip(inputs, gold)]
    labels = [[-100] * len(inp) + enc.choice_ids[g] for inp, g in zip(inputs, gold)]
    return {"input_ids": _pad(rows, enc.pad_id), "attention_mask": _mask(rows), "labels": _pad(labels, -100)}


def generation_batch(enc: Encoded, indices: list[int]) -> dict[str, torch.Tensor]:
    """Inputs for `generate`: left-padded prompts for causal models, right-padded texts for seq2seq."""
    inputs = [enc.input_ids[i] for i in indices]
    left = enc.task == "causal"
    return {"input_ids": _pad(inputs, enc.pad_id, left), "attention_mask": _mask(inputs, left)}


def choice_logprobs(model, enc: Encoded, indices: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every token of every label string, for each example.

    For seq2seq the encoder runs once per input and its states are shared by all label strings.

    Returns:
        `(B, C, T)` token log-probs and `(B, C, T)` mask of real tokens.
    """
    n_choices = len(enc.choice_ids)
    inputs = [enc.input_ids[i] for i in indices]
    batch = len(inputs)
    choice = _pad(enc.choice_ids, -100).to(device)  # (C, T)
    width = choice.shape[1]
    targets = choice.repeat(batch, 1)  # (B*C, T): example-major
    if enc.task == "seq2seq":
        input_ids = _pad(inputs, enc.pad_id).to(device)
        attention = _mask(inputs).to(device)
        encoder = model.get_encoder()
        hidden = encoder(input_ids=input_ids, attention_mask=attention).last_hidden_state
        hidden = hidden.repeat_interleave(n_choices, dim=0)
        attention = attention.repeat_interleave(n_choices, dim=0)
        logits = model(encoder_outputs=(hidden,), attention_mask=attention, labels=targets).logits  # (B*C, T, V)
        token_lp = torch.log_softmax(logits.float(), dim=-1)
        lp = token_lp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    else:
        rows = [inp + c for inp in inputs for c in enc.choice_ids]
        ids = _pad(rows, enc.pad_id).to(device)
        logits = model(input_ids=ids, attention_mask=_mask(rows).to(device)).logits  # (B*C, S, V)
        starts = torch.tensor([len(inp) for inp in inputs for _ in enc.choice_ids], device=device)
        positions = starts.unsqueeze(1) + torch.arange(width, device=device).unsqueeze(0) - 1  # predicting token t
        positions = positions.clamp(max=logits.shape[1] - 1)
        picked = logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # (B*C, T, V)
        token_lp = torch.log_softmax(picked.float(), dim=-1)
        lp = token_lp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = (targets != -100).to(lp.dtype)
    return (lp * mask).view(batch, n_choices, width), mask.view(batch, n_choices, width)
