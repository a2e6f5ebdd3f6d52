"""`PeftModel` and its task subclasses: the PEFT-compatible face of an (IA)^3-adapted model."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ia3.config import IA3Config
from ia3.functional import (
    PREFIX,
    IncompatibleKeys,
    get_peft_model_state_dict,
    resolve_weights_file,
    unwrapped_name,
)
from ia3.functional import WRAPPER_MODULES as WRAPPER_MODULES  # re-exported: scripts/gpu_check_loop.py
from ia3.layer import IA3Layer
from ia3.model_card import write_model_card
from ia3.serialization import WEIGHTS_NAME, load_tensors, save_tensors
from ia3.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from ia3.tuner import IA3Model, set_module

# safetensors metadata key of the label names of a classification adapter: a JSON object {"0": name, ...}, read by
# `AutoPeftModelForSequenceClassification` to rebuild the base with the right head (PEFT ignores metadata)
ID2LABEL_METADATA = "id2label"
LABEL_TASKS = ("SEQ_CLS", "TOKEN_CLS")


def _checkpointing(model: nn.Module) -> bool:
    """PEFT prepares a model for gradient checkpointing unless it says checkpointing is off."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if name in dir(type(model)):  # transformers' property (the second is deprecated)
            return bool(getattr(model, name))
    return True


class PeftModel(nn.Module):
    """A model with (IA)^3 adapters; calls, attributes and `generate` pass through to the wrapped model.

    Every adapter operation is a typed method here that delegates to `base_model` (an `IA3Model`). Other
    attributes pass through to the wrapped model (`config`, `generation_config`, ...), as in PEFT.

    Args:
        model: the base model (changed in place: targeted layers are wrapped).
        peft_config: the first adapter's `IA3Config`.
        adapter_name: its name.
        autocast_adapter_dtype: keep vectors in float32 over float16/bfloat16 weights.
        low_cpu_mem_usage: create the vectors on the meta device, for loading to fill (not for training).
    """

    base_model: IA3Model

    def __init__(
        self,
        model: nn.Module,
        peft_config: IA3Config,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        if peft_config.base_model_name_or_path is None:
            name = getattr(model, "name_or_path", None) or None
            if name:
                peft_config = dataclasses.replace(peft_config, base_model_name_or_path=name)
        self.base_model = IA3Model(model, peft_config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage)
        if _checkpointing(model):
            self.prepare_model_for_gradient_checkpointing(model)

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

    @property
    def active_peft_config(self) -> IA3Config:
        """The config of the active adapter (the first, when several are active)."""
        return self.peft_config[self.active_adapters[0]]

    @property
    def modules_to_save(self) -> set[str] | None:
        """The `modules_to_save` entries of all adapters together (None when there are none), as PEFT lists them."""
        names = {m for config in self.peft_config.values() for m in config.modules_to_save or []}
        return names or None

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: IA3Config,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new adapter (inactive until `set_adapter`).

        Args:
            adapter_name: its name.
            peft_config: what it targets.
            low_cpu_mem_usage: create its vectors on the meta device, for loading to fill.
            autocast_adapter_dtype: float32 vectors over float16/bfloat16 weights (as PEFT does); False: the
                weights' dtype.
        """
        self.base_model.inject_adapter(
            adapter_name,
            peft_config,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapters active (several: their vectors multiply); only active adapters train."""
        for name in [adapter_name] if isinstance(adapter_name, str) else list(adapter_name):
            if name not in self.peft_config:  # PEFT's words, then the names there are
                raise ValueError(
                    f"Adapter {name} not found. ({name!r} is none of this model's {list(self.peft_config)})"
                )
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
        """Run the base model alone inside the block (merged adapters are unmerged exactly, merged back after).

        Inside, no adapter parameter requires grad, as in PEFT.
        """
        with self.base_model.disable_adapter():
            yield

    def disable_adapter_layers(self) -> None:
        """Run the base model alone until `enable_adapter_layers()` (the two halves of `disable_adapter()`)."""
        self.base_model.disable_adapter_layers()

    def enable_adapter_layers(self) -> None:
        """Apply the adapters again after `disable_adapter_layers()`."""
        self.base_model.enable_adapter_layers()

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Switch gradients of these adapters' vectors (and `modules_to_save` copies) on or off."""
        self.base_model.set_requires_grad(adapter_names, requires_grad)

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """Make the input embeddings' output require grad, so that reentrant activation checkpointing passes
        gradients to the vectors while the whole base is frozen (skipped for quantized models, as in PEFT)."""
        if any(getattr(model, flag, False) for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")):
            return model
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings"):

            def make_inputs_require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
                output.requires_grad_(True)

            model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)
        return model

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """The status of each adapter layer (see `ia3.get_layer_status`)."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """The status of the adapters as a whole (see `ia3.get_model_status`)."""
        return get_model_status(self)

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
        """The tensors PEFT saves for `adapter_name`, under PEFT's keys (adapter name stripped); the same as
        `ia3.get_peft_model_state_dict(self, state_dict, adapter_name)`.

        `state_dict`: take them from this full state dict of the model (keys as in `self.state_dict()`) instead of
        the live parameters, e.g. `accelerator.get_state_dict(model)` under FSDP or DeepSpeed ZeRO-3, where each
        process holds only a shard of every parameter.
        """
        return get_peft_model_state_dict(self, state_dict, adapter_name)

    def _label_metadata(self, adapter_name: str) -> dict[str, str]:
        """The label names of a classification adapter's base model, for the weights file's metadata."""
        if self.peft_config[adapter_name].task_type not in LABEL_TASKS:
            return {}
        id2label = getattr(getattr(self.get_base_model(), "config", None), "id2label", None)
        if not isinstance(id2label, dict) or not id2label:
            return {}
        return {ID2LABEL_METADATA: json.dumps({str(k): str(v) for k, v in sorted(id2label.items())})}

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        safe_serialization: bool = True,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write `adapter_config.json` and `adapter_model.safetensors` (adapters other than `"default"` go in a
        subfolder named after them), each file atomically: a crash never leaves a half-written file; and a
        `README.md` model card with the Hub's metadata (an existing card keeps its text, as in PEFT).

        As in PEFT, `state_dict=` (a full state dict of the model, e.g. `accelerator.get_state_dict(model)` under
        FSDP or ZeRO-3) supplies the tensors instead of the live parameters. A classification adapter
        (`SEQ_CLS`, `TOKEN_CLS`) records its base model's `id2label` in the weights file's metadata, so that
        `AutoPeftModelForSequenceClassification` rebuilds the base with the same labels."""
        state_dict = kwargs.pop("state_dict", None)
        if not safe_serialization:
            raise ValueError("ia3 saves adapters as safetensors only (safe_serialization=False is not supported)")
        if Path(save_directory).is_file():
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:  # PEFT's words, then the unknown names themselves
            raise ValueError(
                "You passed an invalid `selected_adapters` arguments, current supported adapter names are "
                f"{list(self.peft_config)} - got {names}. (Unknown: {unknown}.)"
            )
        if not is_main_process:
            return
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        write_model_card(save_directory, self.get_base_model(), isinstance(self, PeftModelForCausalLM))
        for adapter_name in names:
            folder = Path(save_directory) if adapter_name == "default" else Path(save_directory) / adapter_name
            folder.mkdir(parents=True, exist_ok=True)
            tensors = self.adapter_state_dict(adapter_name, state_dict)
            save_tensors(tensors, folder / WEIGHTS_NAME, metadata=self._label_metadata(adapter_name))
            config = self.peft_config[adapter_name]
            auto_mapping = None
            if config.task_type is None:  # PEFT records the base class, to rebuild a custom model
                base_class = type(self.get_base_model())
                auto_mapping = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
            dataclasses.replace(config, inference_mode=True).save_pretrained(folder, auto_mapping_dict=auto_mapping)

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
        """Upload the adapter files (`adapter_config.json`, `adapter_model.safetensors`, `README.md`) to the Hub
        repo `repo_id`, creating the repo if needed. Returns huggingface_hub's commit info."""
        from huggingface_hub import HfApi  # lazy: its API client loads slowly and only uploading needs it

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
        autocast_adapter_dtype: bool = True,
        *,
        low_cpu_mem_usage: bool = False,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        allow_pickle: bool = False,
        torch_device: str | torch.device | None = None,
        device_map: Any = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load an adapter (a folder or a Hub repo id, saved by ia3 or PEFT) onto `model`.

        The adapter's `task_type` picks the subclass (as in PEFT). Every tensor of the file must fit a module of
        `model` and every adapted module must get its tensor: anything else raises, naming the keys.

        Args:
            model: the base model (changed in place).
            model_id: the adapter's folder or Hub repo id.
            adapter_name: the name to load it under.
            is_trainable: False (default): frozen, and the model is put in eval mode.
            config: use this config instead of the saved one.
            autocast_adapter_dtype: float32 vectors over float16/bfloat16 weights.
            low_cpu_mem_usage: create the vectors empty (meta device) and take the file's tensors as they are.
            subfolder, revision, token: where on the Hub.
            allow_pickle: accept a pickled `adapter_model.bin` (unpickling can run code).
            torch_device: where to read the file's tensors to; vectors always end up on their layer's device.
            device_map: accepted for PEFT's signature; vectors are created on each base layer's own device, so a
                model dispatched with a device map needs nothing more.
            kwargs: other PEFT loading options (`cache_dir`, `ephemeral_gpu_offload`, ...), accepted and unused.
        """
        del device_map, kwargs
        if config is None:
            config = IA3Config.from_pretrained(model_id, subfolder=subfolder, revision=revision, token=token)
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        klass = cls if cls is not PeftModel else TASK_TO_MODEL.get(config.task_type or "", PeftModel)
        fresh = dataclasses.replace(config, init_ia3_weights=True)
        had_layers = any(isinstance(m, IA3Layer) for m in model.modules())
        peft_model = klass(model, fresh, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage)
        try:
            peft_model._load_weights(
                model_id, adapter_name, subfolder, revision, token, allow_pickle, torch_device, low_cpu_mem_usage
            )
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
        torch_device: str | torch.device | None = None,
        autocast_adapter_dtype: bool = True,
        *,
        low_cpu_mem_usage: bool = False,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> IncompatibleKeys:
        """Load another adapter into this model under `adapter_name` (not made active).

        Returns PEFT's load result: the adapter keys that got no tensor and the file's keys that fit nothing. ia3
        loads strictly (a key missing or left over raises, naming it), so after a load both lists are empty.

        Args:
            model_id: the adapter's folder or Hub repo id.
            adapter_name: the name to load it under.
            is_trainable: False (default): frozen, and the model is put in eval mode.
            torch_device: where to read the file's tensors to; vectors end up on their layer's device.
            autocast_adapter_dtype: float32 vectors over float16/bfloat16 weights.
            low_cpu_mem_usage: create the vectors empty (meta device) and take the file's tensors as they are.
            subfolder, revision, token: where on the Hub.
            allow_pickle: accept a pickled `adapter_model.bin` (unpickling can run code).
            kwargs: other PEFT loading options, accepted and unused.
        """
        del kwargs
        config = IA3Config.from_pretrained(model_id, subfolder=subfolder, revision=revision, token=token)
        config = dataclasses.replace(config, inference_mode=not is_trainable, init_ia3_weights=True)
        wrapped_before = {name for name, _ in self.base_model.ia3_layers()} | {n for n, _ in self.base_model.wrappers()}
        self.base_model.inject_adapter(
            adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage
        )
        try:
            self._load_weights(
                model_id, adapter_name, subfolder, revision, token, allow_pickle, torch_device, low_cpu_mem_usage
            )
        except BaseException:
            self.base_model.delete_adapter(adapter_name)
            # also undo the wrapping of layers that only this adapter targeted, so the model is as it was
            for name, layer in list(self.base_model.ia3_layers()):
                if name not in wrapped_before and not len(layer.ia3_l):
                    set_module(self.base_model.model, name, layer.base_layer)
            for name, wrapper in list(self.base_model.wrappers()):
                if name not in wrapped_before and not len(wrapper.modules_to_save):
                    set_module(self.base_model.model, name, wrapper.original_module)
            raise
        if not is_trainable:
            self.eval()  # as PEFT does: dropout off after loading an adapter for inference
        return IncompatibleKeys(missing_keys=[], unexpected_keys=[])

    def _load_weights(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        subfolder: str | None,
        revision: str | None,
        token: str | bool | None,
        allow_pickle: bool,
        torch_device: str | torch.device | None = None,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        path = resolve_weights_file(model_id, subfolder=subfolder, revision=revision, token=token)
        tensors = load_tensors(path, allow_pickle=allow_pickle)
        if torch_device is not None:
            tensors = {k: v.to(torch_device) for k, v in tensors.items()}
        self.load_adapter_state_dict(tensors, adapter_name, source=str(path), assign=low_cpu_mem_usage)

    def load_adapter_state_dict(
        self, tensors: dict[str, torch.Tensor], adapter_name: str, source: str = "state dict", assign: bool = False
    ) -> None:
        """Copy PEFT-format adapter tensors into adapter `adapter_name`, strictly: all or nothing.

        `assign`: the adapter's vectors are empty (meta device, `low_cpu_mem_usage`): replace them with the given
        tensors, moved to each layer's device and to the empty vector's dtype.
        """
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
        if assign:
            self._assign_adapter(tensors, adapter_name)
            return
        with torch.no_grad():
            for key, tensor in expected.items():
                tensor.copy_(tensors[key].to(dtype=tensor.dtype, device=tensor.device))

    def _assign_adapter(self, tensors: dict[str, torch.Tensor], adapter_name: str) -> None:
        for name, layer in self.base_model.ia3_layers():
            if adapter_name in layer.ia3_l:
                empty = layer.ia3_l[adapter_name]  # the dtype inject_adapter chose (autocast_adapter_dtype)
                tensor = tensors[f"{PREFIX}{unwrapped_name(name)}.ia3_l"].detach()
                vector = tensor.to(device=layer.base_layer.weight.device, dtype=empty.dtype)
                layer.ia3_l[adapter_name] = nn.Parameter(vector)
        with torch.no_grad():  # modules_to_save copies are full modules, never empty: copy into them
            expected = self.adapter_state_dict(adapter_name)
            for key, tensor in expected.items():
                if not key.endswith(".ia3_l"):
                    tensor.copy_(tensors[key].to(dtype=tensor.dtype, device=tensor.device))
        self.base_model._refresh()  # new parameters: requires_grad and per-example tables from the active adapters


class PeftModelForSeq2SeqLM(PeftModel):
    """(IA)^3 on an encoder-decoder LM (T5, mT5/mT0, BART)."""

    def generate(self, *, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """`generate` of the wrapped model, inputs by keyword only (`input_ids=...`), as PEFT's seq2seq model takes
        them (a positional tensor is a TypeError there too); `adapter_names` as in `PeftModel.generate`."""
        return super().generate(adapter_names=adapter_names, **kwargs)


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
    model: nn.Module,
    peft_config: IA3Config,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap `model` with a new (IA)^3 adapter; returns the `PeftModel` subclass for `peft_config.task_type`.

    Base weights are frozen; only the adapter's vectors (and `modules_to_save` copies) train.

    Args:
        model: the base model (changed in place).
        peft_config: the adapter's config (not changed: the model keeps a resolved copy).
        adapter_name: its name.
        mixed: PEFT's mixed-adapter-type model; ia3 has one adapter type, so only False.
        autocast_adapter_dtype: float32 vectors over float16/bfloat16 weights.
        revision: the base model's Hub revision, recorded in the adapter's config.
        low_cpu_mem_usage: create the vectors on the meta device (for loading weights into; not for training).
    """
    if mixed:
        raise ValueError("mixed=True builds PEFT's PeftMixedModel of several adapter types; ia3 has only (IA)^3")
    if revision is not None:
        if isinstance(peft_config, IA3Config) and peft_config.revision not in (None, revision):
            warnings.warn(
                f"peft_config.revision is {peft_config.revision!r}; revision={revision!r} is recorded instead",
                UserWarning,
                stacklevel=2,
            )
        if isinstance(peft_config, IA3Config):
            peft_config = dataclasses.replace(peft_config, revision=revision)
    if not isinstance(peft_config, IA3Config):
        raise TypeError(f"peft_config must be an ia3.IA3Config; got {type(peft_config).__name__}")
    if any(isinstance(m, IA3Layer) for m in model.modules()):
        raise ValueError("This model already has (IA)^3 layers; use peft_model.add_adapter(...) to add another adapter")
    klass = TASK_TO_MODEL.get(peft_config.task_type or "", PeftModel)
    return klass(model, peft_config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage)
