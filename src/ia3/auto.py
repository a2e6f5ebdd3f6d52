"""`AutoPeftModel*`: load the base model an adapter names, then the adapter."""

from __future__ import annotations

import os
from typing import Any

from ia3.base_models import load_pretrained, resolve_base_model
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
from ia3.tasks import TASKS

# transformers' auto class for each PEFT task type: the recipe's tasks know theirs; the other task types here
_TASK_AUTO_CLASS = {
    **{task.peft_task_type: task.auto_class for task in TASKS.values()},
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
        class of its task, then the adapter. `model_kwargs` (e.g. `dtype`, `device_map`, `gguf_file`) go to the base
        model. The base may be a Hub id, a folder, a `.gguf` file or `module:<package>` (see `ia3.base_models`).
        """
        import transformers

        config = IA3Config.from_pretrained(pretrained_model_name_or_path, revision=revision, token=token)
        task_type = config.task_type
        if cls.target_task is not None and task_type != cls.target_task:
            raise ValueError(
                f"The adapter {pretrained_model_name_or_path} is for task {task_type!r}; {cls.__name__} loads "
                f"{cls.target_task!r} adapters (use AutoPeftModel for any task)"
            )
        if not config.base_model_name_or_path:
            raise ValueError(
                f"The adapter config in {pretrained_model_name_or_path} names no base_model_name_or_path; load the "
                "base model yourself and call PeftModel.from_pretrained(base_model, adapter)"
            )
        auto_class = getattr(transformers, _TASK_AUTO_CLASS.get(task_type or "", "AutoModel"))
        # a Hub id, a folder, a .gguf file or module:<package> (see ia3.base_models)
        ref = resolve_base_model(config.base_model_name_or_path, model_kwargs.pop("gguf_file", None))
        base = load_pretrained(
            auto_class, ref, revision=config.revision, token=token, trust_remote_code=trust_remote_code, **model_kwargs
        )
        return cls.peft_class.from_pretrained(
            base,
            pretrained_model_name_or_path,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            revision=revision,
            token=token,
            allow_pickle=allow_pickle,
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
