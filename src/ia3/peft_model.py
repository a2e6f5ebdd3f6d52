"""`PeftModel` and its task subclasses: the PEFT-compatible face of an (IA)^3-adapted model."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ia3.config import IA3Config
from ia3.hub import resolve_file
from ia3.layer import IA3Layer
from ia3.serialization import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, load_tensors, save_tensors
from ia3.tuner import IA3Model

PREFIX = "base_model.model."
# Modules that torch's FSDP (version 1) and activation checkpointing insert between a module and its children; the
# state dicts they produce leave them out, and so do adapter keys.
WRAPPER_MODULES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _unwrapped_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in WRAPPER_MODULES)


class PeftModel(nn.Module):
    """A model with (IA)^3 adapters; calls, attributes and `generate` pass through to the wrapped model.

    Every adapter operation is a typed method here that delegates to `base_model` (an `IA3Model`). Other
    attributes pass through to the wrapped model (`config`, `generation_config`, ...), as in PEFT.

    Args:
        model: the base model (changed in place: targeted layers are wrapped).
        peft_config: the first adapter's `IA3Config`.
        adapter_name: its name.
        autocast_adapter_dtype: keep vectors in float32 over float16/bfloat16 weights.
    """

    base_model: IA3Model

    def __init__(
        self,
        model: nn.Module,
        peft_config: IA3Config,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
    ) -> None:
        super().__init__()
        if peft_config.base_model_name_or_path is None:
            name = getattr(model, "name_or_path", None) or None
            if name:
                peft_config = dataclasses.replace(peft_config, base_model_name_or_path=name)
        self.base_model = IA3Model(model, peft_config, adapter_name, autocast_adapter_dtype)

    def __getattr__(self, name: str) -> Any:
        """Attributes of the wrapped model (`peft_model.config`, `peft_model.generation_config`, ...).

        Looked up through `base_model` as PEFT does, so `peft_model.model` is the wrapped model itself.
        """
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- adapters --------------------------------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, IA3Config]:
        """Adapter name -> its (resolved) config."""
        return self.base_model.peft_config

    @property
    def active_adapters(self) -> list[str]:
        """Names of the active adapters (their vectors multiply)."""
        return list(self.base_model.active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name, or the list of them when several are active."""
        return self.base_model.active_adapter

    @property
    def targeted_module_names(self) -> list[str]:
        """Names (relative to the wrapped model) of the modules wrapped by (IA)^3 layers."""
        return self.base_model.targeted_module_names

    def add_adapter(self, adapter_name: str, peft_config: IA3Config) -> None:
        """Add a new adapter (inactive until `set_adapter`)."""
        self.base_model.inject_adapter(adapter_name, peft_config)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapters active (several: their vectors multiply); only active adapters train."""
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; the other active adapters stay active (it must not be merged)."""
        self.base_model.delete_adapter(adapter_name)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Create `adapter_name` with vectors `sum_i weights[i] * l_i` (inactive until `set_adapter`).

        A layer that adapter `i` does not touch counts as `l_i = 1` there; see `IA3Model.add_weighted_adapter`.
        """
        self.base_model.add_weighted_adapter(adapters, weights, adapter_name)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block (merged adapters are unmerged exactly, merged back after)."""
        with self.base_model.disable_adapter():
            yield

    @contextmanager
    def per_example(self, adapter_names: list[str] | None) -> Iterator[None]:
        """Inside the block batch row `i` uses adapter `adapter_names[i]` (`"__base__"` for none), for any call
        of the wrapped model or its parts; `forward` and `generate` do this for their `adapter_names`."""
        with self.base_model.per_example(adapter_names):
            yield

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with (IA)^3 layers in place)."""
        return self.base_model.model

    # -- merging ---------------------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights; `unmerge_adapter` undoes it exactly.

        Args:
            adapter_names: adapters to merge; default: the active ones.
            safe_merge: check every layer first and raise (changing nothing) if a merged weight is not finite.
        """
        self.base_model.merge_adapter(adapter_names, safe_merge)

    def unmerge_adapter(self) -> None:
        """Restore every merged layer's original weights bit for bit."""
        self.base_model.unmerge_adapter()

    @property
    def merged(self) -> bool:
        """True when some layer has adapters merged into its weights."""
        return self.base_model.merged

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge adapters (default: the active ones) in place and return the plain wrapped model.

        The result has no (IA)^3 layers or `modules_to_save` wrappers (the active adapter's copies stay);
        this `PeftModel` should not be used afterwards.
        """
        return self.base_model.merge_and_unload(safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Return the plain wrapped model with its original weights (merged layers are unmerged first)."""
        return self.base_model.unload()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, counted as PEFT counts them."""
        trainable = total = 0
        for param in self.parameters():
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print the trainable and total parameter counts, in PEFT's format."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # -- running ---------------------------------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """Run the model. `adapter_names` (one per batch row; `"__base__"` for none) mixes adapters in one batch."""
        with self.base_model.per_example(adapter_names):
            return self.base_model.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """`generate` of the wrapped model; `adapter_names` gives each input row its adapter (beams and sampled
        sequences of a row use that row's adapter)."""
        with self.base_model.per_example(adapter_names):
            return self.base_model.model.generate(*args, **kwargs)

    # -- saving ----------------------------------------------------------------------------------------------------
    def adapter_state_dict(
        self, adapter_name: str = "default", state_dict: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The tensors PEFT saves for `adapter_name`, under PEFT's keys (adapter name stripped).

        `state_dict`: take them from this full state dict of the model (keys as in `self.state_dict()`) instead of
        the live parameters, e.g. `accelerator.get_state_dict(model)` under FSDP or DeepSpeed ZeRO-3, where each
        process holds only a shard of every parameter.
        """
        self.base_model._check_names([adapter_name])
        out: dict[str, torch.Tensor] = {}
        full: dict[str, str] = {}  # PEFT's key -> the key in self.state_dict()
        for name, layer in self.base_model.ia3_layers():
            name = _unwrapped_name(name)
            if adapter_name in layer.ia3_l:
                out[f"{PREFIX}{name}.ia3_l"] = layer.ia3_l[adapter_name].detach()
                full[f"{PREFIX}{name}.ia3_l"] = f"{PREFIX}{name}.ia3_l.{adapter_name}"
        for name, wrapper in self.base_model.wrappers():
            name = _unwrapped_name(name)
            if adapter_name in wrapper.modules_to_save:
                for key, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                    key = _unwrapped_name(key)
                    out[f"{PREFIX}{name}.{key}"] = tensor.detach()
                    full[f"{PREFIX}{name}.{key}"] = f"{PREFIX}{name}.modules_to_save.{adapter_name}.{key}"
        if state_dict is None:
            return out
        missing = [full[k] for k in out if full[k] not in state_dict]
        if missing:
            raise ValueError(
                f"state_dict lacks {len(missing)} tensor(s) of adapter {adapter_name!r}, e.g. {missing[:3]}"
            )
        return {k: state_dict[full[k]].detach() for k in out}

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        safe_serialization: bool = True,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write `adapter_config.json` and `adapter_model.safetensors` (adapters other than `"default"` go in a
        subfolder named after them), each file atomically: a crash never leaves a half-written file.

        As in PEFT, `state_dict=` (a full state dict of the model, e.g. `accelerator.get_state_dict(model)` under
        FSDP or ZeRO-3) supplies the tensors instead of the live parameters."""
        state_dict = kwargs.pop("state_dict", None)
        if not safe_serialization:
            raise ValueError("ia3 saves adapters as safetensors only (safe_serialization=False is not supported)")
        if Path(save_directory).is_file():
            raise ValueError(f"save_directory {save_directory} is a file; pass a folder")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        self.base_model._check_names(names)
        if not is_main_process:
            return
        for adapter_name in names:
            folder = Path(save_directory) if adapter_name == "default" else Path(save_directory) / adapter_name
            folder.mkdir(parents=True, exist_ok=True)
            save_tensors(self.adapter_state_dict(adapter_name, state_dict), folder / WEIGHTS_NAME)
            dataclasses.replace(self.peft_config[adapter_name], inference_mode=True).save_pretrained(folder)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload (IA)^3 adapter",
        create_pr: bool = False,
        selected_adapters: list[str] | None = None,
    ) -> Any:
        """Upload the adapter files (`adapter_config.json`, `adapter_model.safetensors`) to the Hub repo `repo_id`,
        creating the repo if needed. Returns huggingface_hub's commit info."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, selected_adapters=selected_adapters)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                revision=revision,
                commit_message=commit_message,
                create_pr=create_pr,
                repo_type="model",
            )

    # -- loading ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: IA3Config | None = None,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        allow_pickle: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> PeftModel:
        """Load an adapter (a folder or a Hub repo id, saved by ia3 or PEFT) onto `model`.

        The adapter's `task_type` picks the subclass (as in PEFT). Every tensor of the file must fit a module of
        `model` and every adapted module must get its tensor: anything else raises, naming the keys.
        """
        if config is None:
            config = IA3Config.from_pretrained(model_id, subfolder=subfolder, revision=revision, token=token)
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        klass = cls if cls is not PeftModel else TASK_TO_MODEL.get(config.task_type or "", PeftModel)
        fresh = dataclasses.replace(config, init_ia3_weights=True)
        had_layers = any(isinstance(m, IA3Layer) for m in model.modules())
        peft_model = klass(model, fresh, adapter_name, autocast_adapter_dtype)
        try:
            peft_model._load_weights(model_id, adapter_name, subfolder, revision, token, allow_pickle)
        except BaseException:
            # `model` was changed in place; put its original layers back so a failed load leaves it as it was
            if not had_layers:
                peft_model.base_model.unload()
            raise
        if not is_trainable:
            peft_model.eval()  # loaded for inference: dropout off, as PEFT does
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        allow_pickle: bool = False,
    ) -> None:
        """Load another adapter into this model under `adapter_name` (not made active)."""
        config = IA3Config.from_pretrained(model_id, subfolder=subfolder, revision=revision, token=token)
        config = dataclasses.replace(config, inference_mode=not is_trainable, init_ia3_weights=True)
        wrapped_before = {name for name, _ in self.base_model.ia3_layers()} | {n for n, _ in self.base_model.wrappers()}
        self.base_model.inject_adapter(adapter_name, config)
        try:
            self._load_weights(model_id, adapter_name, subfolder, revision, token, allow_pickle)
        except BaseException:
            self.base_model.delete_adapter(adapter_name)
            # also undo the wrapping of layers that only this adapter targeted, so the model is as it was
            from ia3.tuner import _set_module

            for name, layer in list(self.base_model.ia3_layers()):
                if name not in wrapped_before and not len(layer.ia3_l):
                    _set_module(self.base_model.model, name, layer.base_layer)
            for name, wrapper in list(self.base_model.wrappers()):
                if name not in wrapped_before and not len(wrapper.modules_to_save):
                    _set_module(self.base_model.model, name, wrapper.original_module)
            raise

    def _load_weights(self, model_id, adapter_name, subfolder, revision, token, allow_pickle) -> None:
        path = resolve_file(
            model_id, WEIGHTS_NAME, subfolder=subfolder, revision=revision, token=token, missing_ok=True
        )
        if path is None:
            pickled = resolve_file(
                model_id, PICKLE_WEIGHTS_NAME, subfolder=subfolder, revision=revision, token=token, missing_ok=True
            )
            if pickled is None:
                raise FileNotFoundError(f"{model_id} has no {WEIGHTS_NAME} (nor {PICKLE_WEIGHTS_NAME})")
            path = pickled
        self.load_adapter_state_dict(load_tensors(path, allow_pickle=allow_pickle), adapter_name, source=str(path))

    def load_adapter_state_dict(
        self, tensors: dict[str, torch.Tensor], adapter_name: str, source: str = "state dict"
    ) -> None:
        """Copy PEFT-format adapter tensors into adapter `adapter_name`, strictly: all or nothing."""
        expected = self.adapter_state_dict(adapter_name)
        problems: list[str] = []
        unexpected = sorted(set(tensors) - set(expected))
        missing = sorted(set(expected) - set(tensors))
        if unexpected:
            problems.append(f"{len(unexpected)} key(s) match no adapted module of this model, e.g. {unexpected[:3]}")
        if missing:
            problems.append(f"{len(missing)} adapted module(s) get no tensor, e.g. {missing[:3]}")
        for key in sorted(set(tensors) & set(expected)):
            got, want = tuple(tensors[key].shape), tuple(expected[key].shape)
            if got != want:
                problems.append(f"{key} has shape {got} but this model needs {want}")
            elif not tensors[key].dtype.is_floating_point:
                problems.append(f"{key} has dtype {tensors[key].dtype}; expected floating point")
        if problems:
            raise ValueError(
                f"The adapter in {source} does not fit this {type(self.get_base_model()).__name__} (was it trained "
                "on another architecture or size?):\n  - " + "\n  - ".join(problems)
            )
        with torch.no_grad():
            for key, tensor in expected.items():
                tensor.copy_(tensors[key].to(dtype=tensor.dtype, device=tensor.device))


class PeftModelForSeq2SeqLM(PeftModel):
    """(IA)^3 on an encoder-decoder LM (T5, mT5/mT0, BART)."""


class PeftModelForCausalLM(PeftModel):
    """(IA)^3 on a decoder-only LM (GPT-2, Llama, ...)."""


class PeftModelForSequenceClassification(PeftModel):
    """(IA)^3 on a sequence classifier; its head (`classifier` / `score`) trains in full via `modules_to_save`."""


class PeftModelForTokenClassification(PeftModel):
    """(IA)^3 on a token classifier; its head (`classifier` / `score`) trains in full via `modules_to_save`."""


class PeftModelForQuestionAnswering(PeftModel):
    """(IA)^3 on an extractive QA model; its head (`qa_outputs`) trains in full via `modules_to_save`."""


class PeftModelForFeatureExtraction(PeftModel):
    """(IA)^3 on a bare encoder for embeddings."""


TASK_TO_MODEL: dict[str, type[PeftModel]] = {
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "CAUSAL_LM": PeftModelForCausalLM,
    "SEQ_CLS": PeftModelForSequenceClassification,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}


def get_peft_model(
    model: nn.Module, peft_config: IA3Config, adapter_name: str = "default", autocast_adapter_dtype: bool = True
) -> PeftModel:
    """Wrap `model` with a new (IA)^3 adapter; returns the `PeftModel` subclass for `peft_config.task_type`.

    Base weights are frozen; only the adapter's vectors (and `modules_to_save` copies) train.
    """
    if not isinstance(peft_config, IA3Config):
        raise TypeError(f"peft_config must be an ia3.IA3Config; got {type(peft_config).__name__}")
    if any(isinstance(m, IA3Layer) for m in model.modules()):
        raise ValueError("This model already has (IA)^3 layers; use peft_model.add_adapter(...) to add another adapter")
    klass = TASK_TO_MODEL.get(peft_config.task_type or "", PeftModel)
    return klass(model, peft_config, adapter_name, autocast_adapter_dtype)
