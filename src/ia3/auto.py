"""`AutoPeftModel*`: load the base model an adapter names, then the adapter."""

from __future__ import annotations

import os
from typing import Any

from ia3.config import IA3Config
from ia3.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

_TASK_AUTO_CLASS = {
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


class _AutoPeftModel:
    target_task: str | None = None
    peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(f"Use {type(self).__name__}.from_pretrained(adapter_id) to load a model")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        **model_kwargs: Any,
    ) -> PeftModel:
        """Read the adapter's config, load `base_model_name_or_path` (at `revision`) with the transformers auto
        class of its task, then the adapter. `model_kwargs` (e.g. `torch_dtype`, `device_map`) go to the base model.
        """
        import transformers

        config = IA3Config.from_pretrained(pretrained_model_name_or_path, revision=revision, token=token)
        task = config.task_type
        if cls.target_task is not None and task != cls.target_task:
            raise ValueError(
                f"The adapter {pretrained_model_name_or_path} is for task {task!r}; {cls.__name__} loads "
                f"{cls.target_task!r} adapters (use AutoPeftModel for any task)"
            )
        if not config.base_model_name_or_path:
            raise ValueError(
                f"The adapter config in {pretrained_model_name_or_path} names no base_model_name_or_path; load the "
                "base model yourself and call PeftModel.from_pretrained(base_model, adapter)"
            )
        auto_class = getattr(transformers, _TASK_AUTO_CLASS.get(task or "", "AutoModel"))
        base = auto_class.from_pretrained(
            config.base_model_name_or_path, revision=config.revision, token=token, trust_remote_code=trust_remote_code,
            **model_kwargs,
        )
        return cls.peft_class.from_pretrained(
            base, pretrained_model_name_or_path, adapter_name=adapter_name, is_trainable=is_trainable,
            revision=revision, token=token, allow_pickle=allow_pickle,
        )


class AutoPeftModel(_AutoPeftModel):
    pass


class AutoPeftModelForSeq2SeqLM(_AutoPeftModel):
    target_task = "SEQ_2_SEQ_LM"
    peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForCausalLM(_AutoPeftModel):
    target_task = "CAUSAL_LM"
    peft_class = PeftModelForCausalLM


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    target_task = "SEQ_CLS"
    peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_AutoPeftModel):
    target_task = "TOKEN_CLS"
    peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_AutoPeftModel):
    target_task = "QUESTION_ANS"
    peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_AutoPeftModel):
    target_task = "FEATURE_EXTRACTION"
    peft_class = PeftModelForFeatureExtraction
