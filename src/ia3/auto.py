"""`AutoPeftModel*`: load the base model an adapter names, then the adapter."""

from __future__ import annotations

import json
import os
from typing import Any

import transformers
from safetensors import safe_open

from ia3.base_models import load_pretrained, resolve_base_model
from ia3.config import IA3Config
from ia3.hub import resolve_file
from ia3.peft_model import (
    ID2LABEL_METADATA,
    LABEL_TASKS,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from ia3.serialization import WEIGHTS_NAME
from ia3.tasks import TASKS

# transformers' auto class for each PEFT task type: the recipe's tasks know theirs; the other task types here
_TASK_AUTO_CLASS = {
    **{task.peft_task_type: task.auto_class for task in TASKS.values()},
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
# the heads whose first weight dimension is the number of labels, under PEFT's keys
_HEAD_WEIGHTS = [
    f"base_model.model.{head}{leaf}" for head in ("classifier", "score") for leaf in (".weight", ".out_proj.weight")
]


def saved_labels(
    adapter: str | os.PathLike,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> dict[str, Any]:
    """The base-model kwargs (`num_labels`, `id2label`, `label2id`) that fit a saved classification adapter's head.

    From the `id2label` that ia3 writes into the weights file's metadata; for an adapter without it (saved by PEFT),
    `num_labels` from the shape of the saved head. `{}` when neither is there.
    """
    path = resolve_file(adapter, WEIGHTS_NAME, subfolder=subfolder, revision=revision, token=token, missing_ok=True)
    if path is None:
        return {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if ID2LABEL_METADATA in metadata:
                names = json.loads(metadata[ID2LABEL_METADATA])
                id2label = {int(k): str(v) for k, v in names.items()}
                return {
                    "num_labels": len(id2label),
                    "id2label": id2label,
                    "label2id": {v: k for k, v in id2label.items()},
                }
            for key in _HEAD_WEIGHTS:
                if key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    return {"num_labels": int(handle.get_slice(key).get_shape()[0])}
    except (OSError, ValueError, RuntimeError):  # a corrupt file: loading the adapter says so, with the reason
        return {}
    return {}


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
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        torch_device: str | None = None,
        **model_kwargs: Any,
    ) -> PeftModel:
        """Read the adapter's config, load `base_model_name_or_path` (at `revision`) with the transformers auto
        class of its task, then the adapter. `model_kwargs` (e.g. `dtype`, `device_map`, `gguf_file`) go to the base
        model. The base may be a Hub id, a folder, a `.gguf` file or `module:<package>` (see `ia3.base_models`).

        A classification adapter's base gets the labels of the saved head (`num_labels`, `id2label`; see
        `saved_labels`) unless `model_kwargs` names them.
        """
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
        if task_type in LABEL_TASKS and not {"num_labels", "id2label", "config"} & set(model_kwargs):
            model_kwargs.update(saved_labels(pretrained_model_name_or_path, revision=revision, token=token))
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
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            torch_device=torch_device,
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
