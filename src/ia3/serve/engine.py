"""The model side of the server: tokenizer, base model with its adapters, and one batched call per batch.

Only the batcher's worker thread calls an `Engine` (tokenizers and the model are not shared between threads).
Tokenisation, scoring and generation are the task's (`ia3.tasks`), exactly as in the recipe: seq2seq and cls inputs
get the tokenizer's special tokens; causal prompts get BOS only when the tokenizer adds one, and no EOS. Batches pad
to their longest row (causal rows on the left, with position ids that skip the padding), so each row's answer
equals the same input run alone (to float32 rounding).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ia3.recipe.config import ModelArgs
from ia3.recipe.modeling import load_base_model, load_tokenizer
from ia3.serve.config import ServeConfig
from ia3.serve.errors import ApiError
from ia3.tasks import LabelLengthError, get_task
from ia3.tuner import BASE_ADAPTER

log = logging.getLogger("ia3.serve")


@dataclass(frozen=True)
class GenerateParams:
    max_new_tokens: int
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int | None = None


def labels_from_recipes(adapter_folders: list[Path]) -> list[str] | None:
    """`data.label_names` of the first adapter folder with a `recipe.yaml` (as `ia3 train` writes) that names them."""
    for folder in adapter_folders:
        path = folder / "recipe.yaml"
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (yaml.YAMLError, OSError, UnicodeDecodeError):
                continue
            names = (data.get("data") or {}).get("label_names") if isinstance(data, dict) else None
            if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
                return names
    return None


class Engine:
    """Tokenizer + base model (+ `PeftModel` once an adapter is loaded); runs whole batches."""

    def __init__(self, config: ServeConfig, label_names: list[str] | None) -> None:
        self.config = config
        task_class = get_task(config.task)
        args = ModelArgs(name=config.model, task=config.task, gguf_file=config.gguf_file)
        tokenizer = load_tokenizer(args, task_class)
        self.task = task_class(tokenizer, prompt=config.prompt, chat_template=config.chat_template)
        model = load_base_model(args, task_class, label_names or [])
        if not task_class.generates and not label_names:  # a classifier's labels are its head's classes
            label_names = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
        self.label_names = list(label_names) if label_names else None
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.base = model.to(self.device).eval()  # the HF model; adapters wrap its layers in place
        self.peft = None  # ia3 PeftModel, created with the first adapter
        self.tokenizer = tokenizer
        self.max_input_tokens = self._input_budget()
        self._choices: dict[tuple[str, ...], list[list[int]]] = {}
        if self.label_names and task_class.generates:
            self.choices(tuple(self.label_names))  # a label too long for max_label_tokens fails at start

    def _input_budget(self) -> int:
        cfg = self.base.config
        positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        budget = self.config.max_input_tokens
        if positions:
            # a decoder-only model writes its answer in the positions after the prompt
            reserve = (
                max(self.config.max_new_tokens, self.config.max_label_tokens) if self.task.answer_follows_prompt else 0
            )
            budget = min(budget, int(positions) - reserve)
        if budget < 1:
            raise ValueError(
                f"The model takes {positions} positions: nothing is left for the input after "
                f"max_new_tokens / max_label_tokens; lower them"
            )
        return budget

    # -- adapters (worker thread) ----------------------------------------------------------------------------------
    def load_adapter(self, name: str, folder: Path) -> None:
        from ia3.peft_model import PeftModel

        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, folder, adapter_name=name)
        else:
            self.peft.load_adapter(folder, name)
        self.base.eval()

    def delete_adapter(self, name: str) -> None:
        if self.peft is None or name not in self.peft.peft_config:
            raise ApiError(404, "adapter_not_found", f"Adapter {name!r} is not loaded")
        self.peft.delete_adapter(name)

    def _rows(self, adapters: list[str]):
        if self.peft is None:
            assert all(a == BASE_ADAPTER for a in adapters)
            return nullcontext()
        return self.peft.base_model.per_example(adapters)

    # -- inputs ----------------------------------------------------------------------------------------------------
    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, truncated to `max_input_tokens`."""
        return self.task.encode(texts, self.max_input_tokens)

    def choices(self, labels: tuple[str, ...]) -> list[list[int]]:
        """Token ids of each label as the model must produce it (the task's choices)."""
        cached = self._choices.get(labels)
        if cached is None:
            try:
                cached = self.task.encode_choices(list(labels), self.config.max_label_tokens)
            except LabelLengthError as err:
                raise ApiError(
                    422,
                    "invalid_labels",
                    f"parameters.labels: label {err.label!r} is {len(err.tokens)} "
                    f"tokens long; this server allows {err.limit} (--max-label-tokens)",
                ) from None
            if len(self._choices) > 256:
                self._choices.clear()
            self._choices[labels] = cached
        return cached

    # -- running (worker thread) -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, ids: list[list[int]], adapters: list[str], params: GenerateParams) -> list[str]:
        kwargs = dict(num_beams=params.num_beams, do_sample=params.do_sample, num_return_sequences=1)
        if params.do_sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        with self._rows(adapters):
            return self.task.generate(self.base, ids, self.device, params.max_new_tokens, **kwargs)

    @torch.inference_mode()
    def classify(self, ids: list[list[int]], adapters: list[str], labels: tuple[str, ...]) -> list[list[float]]:
        """One score per label for each row: the head's logits (cls), else each label's mean token log-probability
        (rank classification, as the recipe's evaluation)."""
        choices = self.choices(labels) if self.task.generates else [[] for _ in labels]
        with self._rows(adapters):
            scores, _, _ = self.task.score(self.base, ids, choices, self.device)
        return scores.tolist()
