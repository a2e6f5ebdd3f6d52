"""ia3: (IA)^3 parameter-efficient fine-tuning that speaks PEFT's API and adapter format.

(IA)^3: Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", https://arxiv.org/abs/2205.05638.
"""

from ia3.auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from ia3.config import IA3Config, PeftConfig, PeftType, TaskType
from ia3.functional import (
    cast_mixed_precision_params,
    get_base_model_state_dict,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from ia3.layer import IA3Layer, WeightLayout
from ia3.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from ia3.quantization import QuantizedMergeError, prepare_model_for_kbit_training
from ia3.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from ia3.tuner import BASE_ADAPTER, IA3Model
from ia3.version import __version__

__all__ = [
    "__version__",
    "BASE_ADAPTER",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "IA3Config",
    "IA3Layer",
    "IA3Model",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "QuantizedMergeError",
    "TaskType",
    "TunerLayerStatus",
    "TunerModelStatus",
    "WeightLayout",
    "cast_mixed_precision_params",
    "get_base_model_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]
