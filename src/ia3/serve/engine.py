"""The model side of the server: tokenizer, base model with its adapters, and one batched call per batch.

Only the batcher's worker thread calls an `Engine` (tokenizers and the model are not shared between threads).
Tokenisation follows the recipe (`ia3.recipe.features.encode`): seq2seq and cls inputs get the tokenizer's special
tokens; causal prompts get BOS only when the tokenizer adds one, and no EOS. Batches pad to their longest row:
on the left for causal generation, on the right otherwise, so each row's answer equals the same input run alone
(to float32 rounding).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ia3.recipe.config import ModelArgs
from ia3.recipe.evaluate import score_batch
from ia3.recipe.features import Encoded, _mask, _pad, encode_choices
from ia3.recipe.modeling import AUTO_CLASS, load_base_model, load_tokenizer, resolve_model_path
from ia3.serve.config import ServeConfig
from ia3.serve.errors import ApiError
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
        self.task = config.task
        args = ModelArgs(name=config.model, task=config.task)
        self.tokenizer = load_tokenizer(args, config.task)
        if config.task == "cls" and not label_names:
            import transformers

            model = getattr(transformers, AUTO_CLASS["cls"]).from_pretrained(resolve_model_path(config.model))
            label_names = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
        else:
            model = load_base_model(args, config.task, label_names or [])
        self.label_names = list(label_names) if label_names else None
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.base = model.to(self.device).eval()  # the HF model; adapters wrap its layers in place
        self.peft = None  # ia3 PeftModel, created with the first adapter
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            raise ValueError(f"The tokenizer of {config.model!r} has no pad token (nor EOS to pad with)")
        self.max_input_tokens = self._input_budget()
        self._choices: dict[tuple[str, ...], list[list[int]]] = {}
        if self.label_names and self.task != "cls":
            self.choices(tuple(self.label_names))  # a label too long for max_label_tokens fails at start

    def _input_budget(self) -> int:
        cfg = self.base.config
        positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        budget = self.config.max_input_tokens
        if positions:
            reserve = max(self.config.max_new_tokens, self.config.max_label_tokens) if self.task == "causal" else 0
            budget = min(budget, int(positions) - reserve)
        if budget < 1:
            raise ValueError(f"The model takes {positions} positions: nothing is left for the input after "
                             f"max_new_tokens / max_label_tokens; lower them")
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
        tok = self.tokenizer
        if self.task == "causal":
            bos = [tok.bos_token_id] if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False) else []
            ids = tok(texts, add_special_tokens=False, truncation=True, max_length=self.max_input_tokens - len(bos))
            return [bos + row for row in ids["input_ids"]]
        return tok(texts, truncation=True, max_length=self.max_input_tokens)["input_ids"]

    def choices(self, labels: tuple[str, ...]) -> list[list[int]]:
        """Token ids of each label as the model must produce it (seq2seq: decoder target; causal: ' label' + EOS)."""
        cached = self._choices.get(labels)
        if cached is None:
            try:
                cached = encode_choices(self.tokenizer, self.task, list(labels), self.config.max_label_tokens)
            except ValueError as err:
                raise ApiError(422, "invalid_labels", str(err).replace("data.label_length", "max_label_tokens")) from None
            if len(self._choices) > 256:
                self._choices.clear()
            self._choices[labels] = cached
        return cached

    # -- running (worker thread) -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, ids: list[list[int]], adapters: list[str], params: GenerateParams) -> list[str]:
        left = self.task == "causal"
        input_ids = _pad(ids, self.pad_id, left).to(self.device)
        attention = _mask(ids, left).to(self.device)
        kwargs = dict(max_new_tokens=params.max_new_tokens, num_beams=params.num_beams, do_sample=params.do_sample,
                      num_return_sequences=1, pad_token_id=self.pad_id)
        if params.do_sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        with self._rows(adapters):
            out = self.base.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        if left:
            out = out[:, input_ids.shape[1]:]
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    @torch.inference_mode()
    def classify(self, ids: list[list[int]], adapters: list[str], labels: tuple[str, ...]) -> list[list[float]]:
        """One score per label for each row: the head's logits (cls), else each label's mean token log-probability
        (rank classification, as `ia3.recipe.evaluate.score_batch`)."""
        if self.task == "cls":
            batch = {"input_ids": _pad(ids, self.pad_id).to(self.device),
                     "attention_mask": _mask(ids).to(self.device)}
            with self._rows(adapters):
                logits = self.base(**batch).logits.float()
            return logits.tolist()
        enc = Encoded(self.task, ids, [0] * len(ids), self.choices(labels), self.pad_id)
        with self._rows(adapters):
            _, scores, _, _ = score_batch(self.base, enc, list(range(len(ids))), self.device)
        return scores
