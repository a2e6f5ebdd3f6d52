"""`IA3Model`: injects (IA)^3 layers into a model and manages its adapters (add, activate, merge, delete, mix)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ia3.config import IA3Config
from ia3.layer import IA3Layer
from ia3.modules_to_save import ModulesToSaveWrapper
from ia3.per_example import BASE_ADAPTER, PerExampleAdapters, check_adapter_names
from ia3.quantization import check_mergeable
from ia3.targets import find_targets, matches, resolve_config

# Heads that a task trains in full: added to `modules_to_save` when the model has them (as PEFT does).
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"]}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule `name` (dotted, relative to `model`) with `module`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def contiguous_head_input(model: nn.Module) -> None:
    """Hand the model's output head a contiguous input (once per model; `get_peft_model` does it, and so does the
    server for the base model it serves while no adapter is loaded).

    Generation computes the head at the last position only (`logits_to_keep`): a strided `(batch, 1, hidden)`
    slice. With the head's weight frozen (as (IA)^3 leaves it), torch's matmul does not fold such an input into one
    matrix product but runs a batched one, which first copies the whole head weight once per row (SmolLM2, a
    12-row prefill: 1.1 s instead of 0.2 s). A forward pre-hook copies the slice instead (the same values).
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Linear) and not getattr(head, "ia3_contiguous_input", False):
        head.register_forward_pre_hook(_contiguous_input)
        head.ia3_contiguous_input = True


def _contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
    # inference only: a training step (autograd on) measured no gain from it (SmolLM2: 7 % slower with the copy)
    if not torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


class IA3Model(nn.Module):
    """The model with (IA)^3 layers in place. `PeftModel.base_model` is one; `.model` is the wrapped model.

    Args:
        model: the transformers (or any torch) model to adapt; changed in place.
        config: the first adapter's config.
        adapter_name: its name.
        autocast_adapter_dtype: keep vectors in float32 when the base weights are float16/bfloat16 (as PEFT does);
            otherwise vectors take the base weight's dtype.
        low_cpu_mem_usage: create the vectors on the meta device, to be filled by loading (see `inject_adapter`).
    """

    prefix = "ia3_"

    def __init__(
        self,
        model: nn.Module,
        config: IA3Config,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, IA3Config] = {}
        self.active_adapters: list[str] = []
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self._per_example = PerExampleAdapters()  # per-row vector tables, one table row per adapter
        # what `disable_adapter_layers` changed and `enable_adapter_layers` restores: the adapters of each layer it
        # unmerged, and each adapter parameter's requires_grad
        self._disabled_state: tuple[dict[IA3Layer, list[str]], dict[nn.Parameter, bool]] | None = None
        self.inject_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)
        self.set_adapter(adapter_name)
        contiguous_head_input(model)

    def __getattr__(self, name: str) -> Any:
        """Attributes of the wrapped model (`config`, `generation_config`, ...), as PEFT's tuners pass them on."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward."""
        return self.model(*args, **kwargs)

    # -- discovery -------------------------------------------------------------------------------------------------
    def ia3_layers(self) -> Iterator[tuple[str, IA3Layer]]:
        """(name relative to `self.model`, layer) for every (IA)^3 layer."""
        for name, module in self.model.named_modules():
            if isinstance(module, IA3Layer):
                yield name, module

    def wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        """(name relative to `self.model`, wrapper) for every `modules_to_save` wrapper."""
        for name, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    @property
    def targeted_module_names(self) -> list[str]:
        """Names (relative to `self.model`) of the modules wrapped by (IA)^3 layers, as PEFT lists them."""
        return [name for name, _ in self.ia3_layers()]

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name, or the list of them when several are active."""
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    def _check_names(self, names: list[str], allow_base: bool = False) -> None:
        unknown = [n for n in names if n not in self.peft_config and not (allow_base and n == BASE_ADAPTER)]
        if unknown:
            extra = f" or {BASE_ADAPTER!r} for no adapter" if allow_base else ""
            raise ValueError(f"Unknown adapter name(s) {unknown}; this model has {list(self.peft_config)}{extra}")

    def _check_exists(self, names: list[str]) -> None:
        """PEFT's refusal of an adapter name it does not have (by delete and combine), with the names there are."""
        for name in names:
            if name not in self.peft_config:
                raise ValueError(
                    f"Adapter {name} does not exist ({name!r} is none of this model's {list(self.peft_config)})"
                )

    # -- adding ----------------------------------------------------------------------------------------------------
    def _vector_dtype(self, layer: IA3Layer, autocast: bool) -> torch.dtype:
        dtype = layer.base_layer.weight.dtype
        if not dtype.is_floating_point or (autocast and dtype in (torch.float16, torch.bfloat16)):
            return torch.float32
        return dtype

    def inject_adapter(
        self,
        adapter_name: str,
        config: IA3Config,
        autocast_adapter_dtype: bool | None = None,
        low_cpu_mem_usage: bool = False,
    ) -> IA3Config:
        """Add adapter `adapter_name` as described by `config`; returns the resolved config it stores.

        Args:
            adapter_name: the new adapter's name.
            config: what it targets.
            autocast_adapter_dtype: float32 vectors over float16/bfloat16 weights; None: as given to `__init__`.
            low_cpu_mem_usage: create the vectors on the meta device (no memory, no values) for a state dict to be
                assigned to them (`set_peft_model_state_dict(..., low_cpu_mem_usage=True)`); the adapter cannot run
                until then.
        """
        autocast = self.autocast_adapter_dtype if autocast_adapter_dtype is None else autocast_adapter_dtype
        if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE_ADAPTER or "." in adapter_name:
            raise ValueError(
                f"Invalid adapter name {adapter_name!r}: use a non-empty name without '.' (not {BASE_ADAPTER!r})"
            )
        if hasattr(nn.ParameterDict(), adapter_name) or hasattr(nn.ModuleDict(), adapter_name):
            raise ValueError(
                f"Invalid adapter name {adapter_name!r}: it is the name of a torch container method; pick another"
            )
        if adapter_name in self.peft_config:
            raise ValueError(  # PEFT's words, then ia3's advice
                f"Adapter with name '{adapter_name}' already exists. Delete it first or pick another name."
            )
        if not isinstance(config, IA3Config):
            raise TypeError(f"config must be an IA3Config; got {type(config).__name__}")
        resolved = resolve_config(config, self.model)
        if resolved.task_type in TASK_HEADS:
            heads = [h for h in TASK_HEADS[resolved.task_type] if h not in (resolved.modules_to_save or [])]
            resolved = dataclasses.replace(resolved, modules_to_save=[*(resolved.modules_to_save or []), *heads])
        targets = find_targets(resolved, self.model)
        # check every target before changing anything, so that a bad config leaves the model as it was
        for target in targets:
            module = self.model.get_submodule(target.name)
            if isinstance(module, IA3Layer) and module.is_feedforward != target.is_feedforward:
                side = "input" if module.is_feedforward else "output"
                raise ValueError(
                    f"{target.name} already scales its {side} for adapters {list(module.ia3_l)}; adapter "
                    f"{adapter_name!r} would scale the other side. Make feedforward_modules agree across adapters."
                )
        save_names = self._modules_to_save_names(resolved)
        for target in targets:
            module = self.model.get_submodule(target.name)
            if not isinstance(module, IA3Layer):
                module = IA3Layer.from_module(module, target.is_feedforward)
                set_module(self.model, target.name, module)
            dtype = self._vector_dtype(module, autocast)
            if low_cpu_mem_usage:
                module.ia3_l[adapter_name] = nn.Parameter(
                    torch.empty(module.vector_shape(), dtype=dtype, device="meta")
                )
            else:
                module.add_adapter(adapter_name, init_ones=resolved.init_ia3_weights, dtype=dtype)
        for name in save_names:
            wrapper = self.model.get_submodule(name)
            if not isinstance(wrapper, ModulesToSaveWrapper):
                wrapper = ModulesToSaveWrapper(wrapper)
                set_module(self.model, name, wrapper)
            wrapper.add_adapter(adapter_name)
        self.peft_config[adapter_name] = resolved
        self._refresh()
        return resolved

    def _modules_to_save_names(self, config: IA3Config) -> list[str]:
        if not config.modules_to_save:
            return []
        found: list[str] = []
        inside: list[str] = []
        for name, module in self.model.named_modules():
            if not name or any(name.startswith(p + ".") for p in inside):
                continue
            if isinstance(module, ModulesToSaveWrapper):
                inside.append(name)
            if matches(config.modules_to_save, name):
                found.append(name)
                inside.append(name)
        optional = set(TASK_HEADS.get(config.task_type or "", []))
        missing = [m for m in config.modules_to_save if m not in optional and not any(matches([m], f) for f in found)]
        if missing:
            raise ValueError(
                f"modules_to_save names {missing}, which match no module of this {type(self.model).__name__}"
            )
        return found

    # -- activation and training -----------------------------------------------------------------------------------
    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Make these adapters active (their vectors multiply); only active adapters train."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        if not names:
            raise ValueError("set_adapter needs at least one adapter name")
        for name, wrapper in self.wrappers():
            owners = [n for n in names if n in wrapper.modules_to_save]
            if len(owners) > 1:
                raise ValueError(
                    f"Only one adapter can be set at a time for {wrapper}, got {len(owners)}. "  # PEFT's words
                    f"Adapters {owners} each train their own copy of {name} (modules_to_save); only one copy can run, "
                    "so they cannot be active together. Activate one of them, or use per-example adapters "
                    "(adapter_names=...) to give each row its own."
                )
        self.active_adapters = names
        self._refresh()

    def _refresh(self) -> None:
        """Push the active adapters to every layer and wrapper, and set `requires_grad` structurally.

        Everything is frozen first; then, found by type, the vectors of `IA3Layer`s and the copies of
        `ModulesToSaveWrapper`s train when their adapter is active and not in inference mode.
        """
        self._per_example.clear()  # adapters were added, removed or switched: rebuild per-example tables
        trainable = {n for n in self.active_adapters if not self.peft_config[n].inference_mode}
        self.model.requires_grad_(False)
        for _, layer in self.ia3_layers():
            layer.set_adapter([n for n in self.active_adapters if n in layer.ia3_l])
            for name, vector in layer.ia3_l.items():
                vector.requires_grad_(name in trainable)
        for _, wrapper in self.wrappers():
            wrapper.set_active(self.active_adapters)
            for name, module in wrapper.modules_to_save.items():
                module.requires_grad_(name in trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove `adapter_name` from every layer and wrapper; the other active adapters stay active (the first
        remaining adapter becomes active when it was the only one)."""
        self._check_exists([adapter_name])
        for name, layer in self.ia3_layers():
            if adapter_name in layer.merged_adapters:
                raise ValueError(
                    f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them first. "
                    f"(It is merged into {name}: unmerge_adapter() first.)"
                )
        for _, layer in list(self.ia3_layers()):
            if adapter_name in layer.ia3_l:
                layer.delete_adapter(adapter_name)
        for _, wrapper in self.wrappers():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]
        if not self.active_adapters and self.peft_config:
            self.active_adapters = [next(iter(self.peft_config))]
        self._refresh()

    def _adapter_modules(self) -> list[IA3Layer | ModulesToSaveWrapper]:
        modules: list[IA3Layer | ModulesToSaveWrapper] = [layer for _, layer in self.ia3_layers()]
        return modules + [wrapper for _, wrapper in self.wrappers()]

    def _adapter_parameters(self) -> Iterator[nn.Parameter]:
        for _, layer in self.ia3_layers():
            yield from layer.ia3_l.values()
        for _, wrapper in self.wrappers():
            yield from wrapper.modules_to_save.parameters()

    def disable_adapter_layers(self) -> None:
        """Run the base model alone until `enable_adapter_layers`: merged layers are unmerged (exactly) and no
        vector or `modules_to_save` copy requires grad meanwhile, as in PEFT."""
        if self._disabled_state is None:
            self._disabled_state = ({}, {p: p.requires_grad for p in self._adapter_parameters()})
        merged, _ = self._disabled_state
        for _, layer in self.ia3_layers():
            if layer.merged_adapters:
                merged[layer] = list(layer.merged_adapters)
                layer.unmerge()
        for module in self._adapter_modules():
            module.disabled = True
        for param in self._adapter_parameters():
            param.requires_grad_(False)

    def enable_adapter_layers(self) -> None:
        """Undo `disable_adapter_layers`: adapters apply again, the layers it unmerged are merged back and each
        adapter parameter requires grad as it did before."""
        for module in self._adapter_modules():
            module.disabled = False
        if self._disabled_state is None:
            return
        (merged, grads), self._disabled_state = self._disabled_state, None
        for layer, adapters in merged.items():
            layer.merge([a for a in adapters if a in layer.ia3_l])
        for param in self._adapter_parameters():
            param.requires_grad_(grads.get(param, param.requires_grad))

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Switch gradients of these adapters' vectors and `modules_to_save` copies on or off (until the next
        `set_adapter`, which sets them from the active adapters again)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        for _, layer in self.ia3_layers():
            for name in names:
                if name in layer.ia3_l:
                    layer.ia3_l[name].requires_grad_(requires_grad)
        for _, wrapper in self.wrappers():
            for name in names:
                if name in wrapper.modules_to_save:
                    wrapper.modules_to_save[name].requires_grad_(requires_grad)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block; merged adapters are unmerged (exactly) and merged back after.

        Inside, no adapter parameter requires grad (as in PEFT); after, the trainable ones do again.
        """
        if self._disabled_state is not None:  # already off (disable_adapter_layers): stays off after the block
            yield
            return
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()

    # -- per-example adapters --------------------------------------------------------------------------------------
    @contextmanager
    def per_example(self, adapter_names: list[str] | None, tokens: torch.Tensor | None = None) -> Iterator[None]:
        """Inside the block each batch row uses its own adapter (`BASE_ADAPTER` for none), in one pass.

        Every layer gathers its vectors into a `(batch, F)` table once on entry; `generate` reuses it for every
        decoding step, repeating rows for beams and returned sequences. See `ia3.per_example`.

        Args:
            adapter_names: one adapter name per batch row; None: the active adapters for every row.
            tokens: for a packed batch (one sequence holding several rows' tokens, as `ia3.packed` runs): each
                token's row, `(N,)` indices into `adapter_names` (not with `modules_to_save`).

        Raises:
            ValueError: not a non-empty list, unknown names, or a merged layer.
        """
        if adapter_names is None:
            yield
            return
        names = check_adapter_names(adapter_names)
        self._check_names(sorted(set(names)), allow_base=True)
        with self._per_example.rows(list(self.ia3_layers()), [w for _, w in self.wrappers()], names, tokens):
            yield

    # -- merging ---------------------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights; `unmerge_adapter` undoes it exactly.

        Keeps a copy of every merged layer's original weight and bias until unmerge (memory: the size of the
        targeted layers' weights). With `safe_merge`, every layer is checked first and nothing changes on failure.
        """
        self._merge(adapter_names, safe_merge, keep_original=True)

    def _merge(self, adapter_names: list[str] | None, safe_merge: bool, keep_original: bool) -> None:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        self._check_names(names)
        already = sorted({n for _, layer in self.ia3_layers() for n in layer.merged_adapters})
        if already:
            todo = [n for n in names if n not in already]
            message = (  # PEFT's words
                f"Already following adapters were merged {','.join(already)}. "
                f"You are now additionally merging {','.join(todo)}."
                if todo
                else "All adapters are already merged, nothing to do."
            )
            warnings.warn(message, UserWarning, stacklevel=3)
        # each layer merges the adapters it has (an adapter need not touch every layer)
        layers = [(name, layer, [n for n in names if n in layer.ia3_l]) for name, layer in self.ia3_layers()]
        for _, layer, own in layers:  # a quantised layer refuses before any layer has changed
            if own:
                check_mergeable(layer.base_layer)
        if safe_merge:
            broken = [name for name, layer, own in layers if not layer.check_merge(own)]
            if broken:
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {', '.join(names)} seems to be broken. "
                    f"(Merging it would give non-finite weights in {broken[:5]}; nothing was merged. Check its vectors "
                    "for NaN/inf or huge values.)"
                )
        for _, layer, own in layers:
            layer.merge(own, keep_original=keep_original)

    def unmerge_adapter(self) -> None:
        """Restore every merged layer's original weights bit for bit."""
        for _, layer in self.ia3_layers():
            layer.unmerge()

    @property
    def merged(self) -> bool:
        """True when some layer has adapters merged into its weights."""
        return any(layer.merged_adapters for _, layer in self.ia3_layers())

    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Put every layer's base layer back (merged in place first when `merge`: no copy of any weight)."""
        if merge:
            self._merge(adapter_names, safe_merge, keep_original=False)
        for name, layer in list(self.ia3_layers()):
            if not merge and layer.merged_adapters:
                layer.unmerge()
            set_module(self.model, name, layer.base_layer)
        for name, wrapper in list(self.wrappers()):
            keep = wrapper.module_for(wrapper.active_adapter) if merge else wrapper.original_module
            set_module(self.model, name, keep)
        return self.model

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge adapters (default: the active ones) and return the plain model, without (IA)^3 layers."""
        return self._unload(True, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Return the plain base model with its original weights (merged layers are unmerged first)."""
        return self._unload(False)

    # -- combining -------------------------------------------------------------------------------------------------
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Create `adapter_name` whose vector in every layer is `sum_i weights[i] * l_i`.

        Unlike PEFT, a layer that adapter `i` does not touch counts as `l_i = 1` (the identity that adapter applies
        there), not 0; so combining adapters that target different modules keeps each one's effect, and weights
        summing to 1 give the identity wherever no adapter acts.
        """
        adapters = list(adapters)
        weights = [float(w) for w in weights]
        if not adapters or len(adapters) != len(weights):
            raise ValueError(f"Need one weight per adapter; got {len(adapters)} adapters and {len(weights)} weights")
        self._check_exists(adapters)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists")
        configs = [self.peft_config[a] for a in adapters]
        target_sets = {name for name, layer in self.ia3_layers() if any(a in layer.ia3_l for a in adapters)}
        saved = [a for a in adapters if configs[adapters.index(a)].modules_to_save]
        if any(sum(a in w.modules_to_save for a in adapters) > 1 for _, w in self.wrappers()):
            raise ValueError(
                "Cannot add weighted adapters targeting the same module with modules_to_save. "
                f"(Adapters {saved} each train their own copy of a module; copies cannot be averaged.)"
            )
        if len(saved) > 1:
            raise ValueError(
                f"Adapters {saved} train full modules (modules_to_save) of different modules; ia3 does not combine "
                "them (the new adapter would get one adapter's copies and untrained ones of the others)"
            )
        first = configs[0]
        merged_config = dataclasses.replace(
            first,
            target_modules=sorted(target_sets),
            feedforward_modules=sorted(n for n in target_sets if self.model.get_submodule(n).is_feedforward),
            exclude_modules=None,
            modules_to_save=configs[adapters.index(saved[0])].modules_to_save if saved else None,
            init_ia3_weights=True,
        )
        self.inject_adapter(adapter_name, merged_config)
        with torch.no_grad():
            for _, layer in self.ia3_layers():
                if adapter_name not in layer.ia3_l:
                    continue
                total = torch.zeros_like(layer.ia3_l[adapter_name])
                for adapter, weight in zip(adapters, weights):
                    vector = layer.ia3_l[adapter] if adapter in layer.ia3_l else torch.ones_like(total)
                    total += weight * vector.to(total.dtype)
                layer.ia3_l[adapter_name].copy_(total)
            if saved:
                for _, wrapper in self.wrappers():
                    if saved[0] in wrapper.modules_to_save and adapter_name in wrapper.modules_to_save:
                        wrapper.modules_to_save[adapter_name].load_state_dict(
                            wrapper.modules_to_save[saved[0]].state_dict()
                        )
        self._refresh()


def is_peft_model(model: nn.Module) -> bool:
    """True for a `PeftModel` (a module whose `base_model` is an `IA3Model`), told by structure so that the modules
    below `ia3.peft_model` need not import it (it imports them)."""
    return isinstance(getattr(model, "base_model", None), IA3Model)
