"""Tasks: everything that differs between label generation (seq2seq, causal LM) and a classifier head.

A `Task` is bound to a tokenizer and owns, for its kind of model:

* which transformers auto class loads the model, and PEFT's task type for the adapter;
* how a text becomes model input (prompt template, BOS/EOS rules, an optional chat template) and how a label
  becomes the token sequence the model must produce (its "choice");
* the training loss, computing the LM head only where a label token is predicted;
* rank classification: each choice's summed log-probability (no fake labels needed);
* generation of new tokens and their decoding.

The recipe (features, training, evaluation, prediction), the CLI and the server call these methods; no other module
branches on the task's name. A new task is one new subclass registered in `TASKS`.

Token conventions:
* seq2seq: encoder input = the text with the tokenizer's special tokens; choice = the label as decoder target (EOS
  included, as the tokenizer adds it).
* causal: input = the prompt (`prompt` with the text; BOS only where the tokenizer adds one; wrapped in the chat
  template when `chat_template`), choice = `" " + label` + EOS, or with a chat template the assistant's turn holding
  the label, up to and including its end-of-turn token. Rows are padded on the left, with explicit position ids, so
  every row's label tokens sit in the last positions and `logits_to_keep` computes the head only there.
* cls: input = the text; the choices are the classifier head's classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ia3.families import (
    CausalDecodeState,
    DecodeState,
    Seq2SeqDecodeState,
    attention_mask,
    cache_argument,
    cache_of,
    eos_ids,
    keep_logits,
    left_padded,
    pad_rows,
    unwrap,
)

PROMPT_FIELD = "{text}"
_SENTINEL = "\u2063IA3_TEXT\u2063"  # stands for the text while a chat template is rendered


class LabelLengthError(ValueError):
    """A label whose token sequence is longer than allowed; callers name their own setting for the limit."""

    def __init__(self, label: str, tokens: list[str], limit: int) -> None:
        self.label, self.tokens, self.limit = label, tokens, limit
        super().__init__(f"Label {label!r} is {len(tokens)} tokens long ({tokens}) but at most {limit} are allowed")


@dataclass
class Generation:
    """One generated answer: its new tokens (the end-of-answer token excluded) and why it ended ("stop": an
    end-of-answer token; "length": the token limit)."""

    tokens: list[int]
    finish_reason: str


def _recipe_flag(field: str) -> str:
    return f"--data.{field}"


class Task:
    """One kind of model and what it learns. Subclasses set the class attributes and implement the methods.

    Args:
        tokenizer: the model's tokenizer (prepared with `prepare_tokenizer`).
        prompt: the text around each input, with `{text}` where it goes (causal task; the others read the text as
            it is).
        chat_template: wrap the prompt in the tokenizer's chat template, as a user turn (causal task).
    """

    name: ClassVar[str]
    peft_task_type: ClassVar[str]
    auto_class: ClassVar[str]
    generates: ClassVar[bool]
    """True when the model writes the label (choices are token sequences); False for a classifier head."""
    answer_follows_prompt: ClassVar[bool] = False
    """True when the answer takes positions after the prompt (decoder-only models), so both share the context."""
    decode_state: ClassVar[type[DecodeState] | None] = None
    """The running-batch state of the model family, for token-by-token decoding (None: the task does not
    generate)."""

    def __init__(self, tokenizer: Any, prompt: str = PROMPT_FIELD, chat_template: bool = False) -> None:
        problems = self.check_settings(prompt, chat_template)
        if problems:
            raise ValueError("; ".join(problems))
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.chat_template = chat_template
        if tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token (and no EOS token to pad with); set tokenizer.pad_token")
        self.pad_id: int = tokenizer.pad_token_id

    # -- settings ------------------------------------------------------------------------------------------------
    @classmethod
    def check_settings(cls, prompt: str, chat_template: bool, flag: Callable[[str], str] = _recipe_flag) -> list[str]:
        """Problems with these prompt settings for this task (empty when they are fine), each naming its setting
        as `flag(field)` gives it (default: the recipe's `--data.<field>`)."""
        if chat_template:
            return [f"{flag('chat_template')} applies to causal (decoder-only) models, not to task {cls.name!r}"]
        return []

    # -- loading -------------------------------------------------------------------------------------------------
    @classmethod
    def prepare_tokenizer(cls, tokenizer: Any, model_name: str) -> None:
        """Fix up a freshly loaded tokenizer for this task (in place)."""

    @classmethod
    def model_kwargs(cls, label_names: list[str]) -> dict[str, Any]:
        """Extra `from_pretrained` arguments for the base model."""
        return {}

    @classmethod
    def prepare_model(cls, model: nn.Module) -> None:
        """Fix up a freshly loaded base model for this task (in place)."""

    # -- encoding ------------------------------------------------------------------------------------------------
    def encode(self, texts: list[str], max_length: int, reserve: int = 0) -> list[list[int]]:
        """Token ids of each input, at most `max_length - reserve` long (`reserve`: room kept for the answer)."""
        raise NotImplementedError

    def encode_choices(self, label_names: list[str], max_tokens: int) -> list[list[int]]:
        """Token ids of each label as the model must produce it; `LabelLengthError` beyond `max_tokens`."""
        return [[] for _ in label_names]

    # -- training ------------------------------------------------------------------------------------------------
    def train_batch(
        self, inputs: list[list[int]], choices: list[list[int]], gold: list[int]
    ) -> dict[str, torch.Tensor]:
        """Model inputs for the training loss of rows `inputs` whose answers are `choices[gold[i]]`."""
        raise NotImplementedError

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropy over the batch's label tokens (or rows, for a classifier)."""
        raise NotImplementedError

    def loss_units(self, choices: list[list[int]], gold: list[int]) -> int:
        """What `loss_sum` sums over: label tokens (LM) or rows (classifier)."""
        return sum(len(choices[g]) for g in gold)

    # -- scoring -------------------------------------------------------------------------------------------------
    def choice_logprobs(
        self, model: nn.Module, inputs: list[list[int]], choices: list[list[int]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of every token of every choice after every input.

        Returns:
            `(B, C, T)` token log-probs (0 at padding) and the `(B, C, T)` mask of real tokens.
        """
        raise NotImplementedError

    def score(
        self, model: nn.Module, inputs: list[list[int]], choices: list[list[int]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rank classification of a batch.

        Returns:
            `scores` `(B, C)`: the mean token log-probability of each choice (length-normalised), or the head's
            logits; `nll` `(B, C)`: each choice's summed negative log-likelihood; `units` `(B, C)`: its token count
            (1 for a classifier), so that a gold choice's loss is `nll[i, g] / units[i, g]`.
        """
        lp, mask = self.choice_logprobs(model, inputs, choices, device)
        units = mask.sum(-1)
        nll = -lp.sum(-1)
        return -nll / units.clamp(min=1), nll, units

    # -- generation ----------------------------------------------------------------------------------------------
    def generation_inputs(self, inputs: list[list[int]]) -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask` for `generate`."""
        return {"input_ids": pad_rows(inputs, self.pad_id), "attention_mask": attention_mask(inputs)}

    def new_tokens(self, output: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """The generated part of `generate`'s output."""
        return output

    @torch.no_grad()
    def generate_tokens(
        self, model: nn.Module, inputs: list[list[int]], device: torch.device, max_new_tokens: int, **kwargs: Any
    ) -> list[Generation]:
        """Each input's new tokens through transformers' `generate` (greedy unless `kwargs` say otherwise), cut
        before the first end-of-answer token, with the reason generation ended."""
        if not self.generates:
            raise ValueError(f"Task {self.name!r} does not generate text")
        batch = {k: v.to(device) for k, v in self.generation_inputs(inputs).items()}
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("num_beams", 1)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=self.pad_id, **kwargs)
        eos = eos_ids(unwrap(model), self.tokenizer)
        results = []
        for row in self.new_tokens(out, batch["input_ids"].shape[1]).tolist():
            ended = next((i for i, t in enumerate(row) if t in eos), None)  # later tokens are padding
            results.append(Generation(row[:ended], "stop") if ended is not None else Generation(row, "length"))
        return results

    def generate(
        self, model: nn.Module, inputs: list[list[int]], device: torch.device, max_new_tokens: int, **kwargs: Any
    ) -> list[str]:
        """Decoded new tokens for each input (as `generate_tokens`; special tokens dropped)."""
        generated = self.generate_tokens(model, inputs, device, max_new_tokens, **kwargs)
        return self.tokenizer.batch_decode([g.tokens for g in generated], skip_special_tokens=True)

    def plain_prompt(self, text: str) -> tuple[list[int], int]:
        """Token ids of `text` taken as it is (no prompt template around it), with the special tokens the model's
        input starts or ends with, and how many leading ids a truncation must keep."""
        return self.tokenizer(text)["input_ids"], 0

    @staticmethod
    def truncate(ids: list[int], limit: int, head: int = 0) -> list[int]:
        """`ids` cut to `limit` tokens: the first `head` kept, then the last ones (the end of an input, next to the
        answer, stays)."""
        return ids[:head] + ids[len(ids) - (limit - head) :]


class Seq2SeqTask(Task):
    """Encoder-decoder LMs (T5, mT5/mT0, BART): the decoder writes the label."""

    name = "seq2seq"
    peft_task_type = "SEQ_2_SEQ_LM"
    auto_class = "AutoModelForSeq2SeqLM"
    generates = True
    decode_state = Seq2SeqDecodeState

    def encode(self, texts: list[str], max_length: int, reserve: int = 0) -> list[list[int]]:
        # the encoder reads the text as it is (the seed recipe's input); `prompt` applies to causal models
        return self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]

    def encode_choices(self, label_names: list[str], max_tokens: int) -> list[list[int]]:
        choices = []
        for name in label_names:
            ids = self.tokenizer(text_target=name, add_special_tokens=True)["input_ids"]
            if len(ids) > max_tokens:
                raise LabelLengthError(name, self.tokenizer.convert_ids_to_tokens(ids), max_tokens)
            choices.append(ids)
        return choices

    def train_batch(self, inputs, choices, gold):
        return {
            "input_ids": pad_rows(inputs, self.pad_id),
            "attention_mask": attention_mask(inputs),
            "labels": pad_rows([choices[g] for g in gold], -100),
        }

    def loss_sum(self, model, batch):
        # the decoder runs on the label tokens only, so every logit is at a label position already
        logits = model(**batch).logits.float()
        return nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum"
        )

    def choice_logprobs(self, model, inputs, choices, device):
        """The encoder runs once per input; its states are shared by all choices.

        Both passes go through the model's own forward (the first with a one-token decoder input, for the encoder
        states), never through `get_encoder()` alone: a sharded (FSDP) model gathers its weights in that forward."""
        n_choices, batch = len(choices), len(inputs)
        choice = pad_rows(choices, -100).to(device)  # (C, T)
        targets = choice.repeat(batch, 1)  # (B*C, T), example-major
        input_ids = pad_rows(inputs, self.pad_id).to(device)
        mask = attention_mask(inputs).to(device)
        start_id = getattr(unwrap(model).config, "decoder_start_token_id", None)
        start = torch.full((batch, 1), self.pad_id if start_id is None else start_id, device=device)
        hidden = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=start).encoder_last_hidden_state
        hidden = hidden.repeat_interleave(n_choices, dim=0)
        mask = mask.repeat_interleave(n_choices, dim=0)
        logits = model(encoder_outputs=(hidden,), attention_mask=mask, labels=targets).logits  # (B*C, T, V)
        return _gather_logprobs(logits, targets, batch, n_choices)

    def new_tokens(self, output, prompt_width):
        return output[:, 1:]  # the decoder's start token is not part of the answer


class CausalTask(Task):
    """Decoder-only LMs (GPT-2, Llama, SmolLM, Qwen, ...): the label is written after the prompt."""

    name = "causal"
    peft_task_type = "CAUSAL_LM"
    auto_class = "AutoModelForCausalLM"
    generates = True
    answer_follows_prompt = True
    decode_state = CausalDecodeState

    @classmethod
    def check_settings(cls, prompt: str, chat_template: bool, flag: Callable[[str], str] = _recipe_flag) -> list[str]:
        if PROMPT_FIELD not in prompt:
            return [f"{flag('prompt')} must contain {PROMPT_FIELD!r} where the text goes; got {prompt!r}"]
        return []

    def __init__(self, tokenizer: Any, prompt: str = PROMPT_FIELD, chat_template: bool = False) -> None:
        super().__init__(tokenizer, prompt, chat_template)
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.chat_template is set but this tokenizer has no chat template; unset it")
        if tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has no EOS token; the causal task ends every label with EOS")
        add_bos = tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False)
        self._text_bos = [tokenizer.bos_token_id] if add_bos else []  # as the tokenizer starts a text
        self._bos = [] if chat_template else self._text_bos  # a chat template writes its own
        before, after = self._prompt_parts()
        self._before = tokenizer(before, add_special_tokens=False)["input_ids"] if before else []
        self._after = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []

    def _prompt_parts(self) -> tuple[str, str]:
        """The prompt's text before and after the input text (the chat template's turn markers included)."""
        if not self.chat_template:
            before, _, after = self.prompt.partition(PROMPT_FIELD)
            return before, after
        rendered = self._render(self.prompt.replace(PROMPT_FIELD, _SENTINEL))
        before, found, after = rendered.partition(_SENTINEL)
        if not found:
            raise ValueError("The tokenizer's chat template drops the user's message; unset data.chat_template")
        return before, after

    def _render(self, user: str, answer: str | None = None) -> str:
        messages = [{"role": "user", "content": user}]
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)

    @classmethod
    def prepare_tokenizer(cls, tokenizer: Any, model_name: str) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"The tokenizer of {model_name!r} has no EOS token; the causal task ends labels with EOS")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def prepare_model(cls, model: nn.Module) -> None:
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = config.eos_token_id

    def encode(self, texts: list[str], max_length: int, reserve: int = 0) -> list[list[int]]:
        fixed = len(self._bos) + len(self._before) + len(self._after)
        budget = max_length - reserve - fixed
        if budget < 1:
            raise ValueError(
                f"A length limit of {max_length} tokens leaves no room for the text: the prompt takes "
                f"{fixed} and the answer {reserve}"
            )
        ids = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=budget)["input_ids"]
        return [self._bos + self._before + row + self._after for row in ids]

    def encode_choices(self, label_names: list[str], max_tokens: int) -> list[list[int]]:
        tok = self.tokenizer
        choices = []
        for name in label_names:
            if self.chat_template:
                user = self.prompt.replace(PROMPT_FIELD, "")
                full, prefix = self._render(user, name), self._render(user)
                if not full.startswith(prefix):
                    raise ValueError(
                        "The chat template renders the assistant's turn in a way that cannot be split "
                        "from the prompt; unset data.chat_template"
                    )
                ids = tok(full[len(prefix) :].rstrip(), add_special_tokens=False)["input_ids"]
            else:
                ids = tok(" " + name, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            if len(ids) > max_tokens:
                raise LabelLengthError(name, tok.convert_ids_to_tokens(ids), max_tokens)
            choices.append(ids)
        return choices

    def train_batch(self, inputs, choices, gold):
        rows = [inp + choices[g] for inp, g in zip(inputs, gold)]
        labels = [[-100] * len(inp) + choices[g] for inp, g in zip(inputs, gold)]
        batch = left_padded(rows, self.pad_id)
        batch["labels"] = pad_rows(labels, -100, left=True)
        return batch

    def _tail_logits(self, model: nn.Module, batch: dict[str, torch.Tensor], width: int) -> torch.Tensor:
        """Logits predicting the last `width` tokens of each (left-padded) row: `(B, width, V)`.

        The head runs at the last `width + 1` positions only (transformers' `logits_to_keep`), not at every
        position of the prompt; the very last position predicts nothing in the row and is dropped.
        """
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, **keep_logits(model, width + 1)).logits[:, -(width + 1) :]
        return logits[:, :-1]

    def loss_sum(self, model, batch):
        labels = batch["labels"]
        width = int((labels != -100).sum(-1).max())  # the longest label: all label tokens are in the last `width`
        logits = self._tail_logits(model, batch, width).float()
        return nn.functional.cross_entropy(
            logits.flatten(0, 1), labels[:, -width:].flatten(), ignore_index=-100, reduction="sum"
        )

    def choice_logprobs(self, model, inputs, choices, device):
        """The prompt runs once per input; its key/value cache is shared by all choices.

        Pass 1: the left-padded prompts, keeping the cache and the logits of the last position (which predict each
        choice's first token). Pass 2: every (input, choice) pair's choice tokens but the last, on that input's
        cache repeated per choice; their logits predict the choice's remaining tokens.
        """
        n_choices, batch = len(choices), len(inputs)
        width = max(len(c) for c in choices)
        prompts = {k: v.to(device) for k, v in left_padded(inputs, self.pad_id).items()}
        first = model(**prompts, use_cache=width > 1, **keep_logits(model, 1))
        logits = first.logits[:, -1:].repeat_interleave(n_choices, dim=0)  # (B*C, 1, V)
        targets = pad_rows(choices, -100).repeat(batch, 1).to(device)  # (B*C, T), example-major
        if width > 1:
            cache = cache_of(first)
            cache.batch_repeat_interleave(n_choices)
            tails = [c[:-1] for c in choices] * batch
            tail_mask = attention_mask(tails).to(device)
            mask = torch.cat([prompts["attention_mask"].repeat_interleave(n_choices, dim=0), tail_mask], dim=1)
            start = prompts["attention_mask"].sum(-1, keepdim=True).repeat_interleave(n_choices, dim=0)
            positions = start + torch.arange(width - 1, device=device)
            rest = model(
                input_ids=pad_rows(tails, self.pad_id).to(device),
                attention_mask=mask,
                position_ids=positions,
                use_cache=False,
                **{cache_argument(model): cache},
            )
            logits = torch.cat([logits, rest.logits], dim=1)  # (B*C, T, V)
        return _gather_logprobs(logits, targets, batch, n_choices)

    def generation_inputs(self, inputs):
        return {
            "input_ids": pad_rows(inputs, self.pad_id, left=True),
            "attention_mask": attention_mask(inputs, left=True),
        }

    def new_tokens(self, output, prompt_width):
        return output[:, prompt_width:]

    def plain_prompt(self, text: str) -> tuple[list[int], int]:
        # BOS as the tokenizer starts a text, and no EOS: the answer follows
        bos = self._text_bos
        return bos + self.tokenizer(text, add_special_tokens=False)["input_ids"], len(bos)


class ClassificationTask(Task):
    """Sequence classifiers: a head (trained in full through `modules_to_save`) scores the classes."""

    name = "cls"
    peft_task_type = "SEQ_CLS"
    auto_class = "AutoModelForSequenceClassification"
    generates = False

    @classmethod
    def model_kwargs(cls, label_names: list[str]) -> dict[str, Any]:
        if not label_names:
            return {}
        return {
            "num_labels": len(label_names),
            "id2label": dict(enumerate(label_names)),
            "label2id": {n: i for i, n in enumerate(label_names)},
        }

    def encode(self, texts: list[str], max_length: int, reserve: int = 0) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]

    def train_batch(self, inputs, choices, gold):
        return {
            "input_ids": pad_rows(inputs, self.pad_id),
            "attention_mask": attention_mask(inputs),
            "labels": torch.tensor(gold),
        }

    def loss_units(self, choices, gold):
        return len(gold)

    def loss_sum(self, model, batch):
        logits = model(**batch).logits.float()
        return nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")

    def score(self, model, inputs, choices, device):
        batch = {
            "input_ids": pad_rows(inputs, self.pad_id).to(device),
            "attention_mask": attention_mask(inputs).to(device),
        }
        logits = model(**batch).logits.float()
        nll = -torch.log_softmax(logits, dim=-1)
        return logits, nll, torch.ones_like(logits)

    def choice_logprobs(self, model, inputs, choices, device):
        raise ValueError("A classifier has no label tokens to score; the T-Few losses need a label-generation task")


def _gather_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, batch: int, n_choices: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B*C, T, V)` logits and `(B*C, T)` targets (-100 = not a choice token) -> `(B, C, T)` log-probs and mask."""
    token_lp = torch.log_softmax(logits.float(), dim=-1)
    lp = token_lp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = (targets != -100).to(lp.dtype)
    width = targets.shape[1]
    return (lp * mask).view(batch, n_choices, width), mask.view(batch, n_choices, width)


TASKS: dict[str, type[Task]] = {t.name: t for t in (Seq2SeqTask, CausalTask, ClassificationTask)}
TASK_OF_PEFT_TYPE: dict[str, type[Task]] = {t.peft_task_type: t for t in TASKS.values()}


def get_task(name: str) -> type[Task]:
    """The task class called `name` (`seq2seq`, `causal`, `cls`)."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"Unknown task {name!r}; ia3 knows {sorted(TASKS)}") from None
