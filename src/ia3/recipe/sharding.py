"""FSDP for `ia3 train`: the frozen base sharded across processes with torch's FSDP2 (`fully_shard`).

Two launches reach it:
* accelerate's FSDP (`configs/accelerate/fsdp.yaml`, `fsdp_version: 2`) on GPUs: `accelerator.prepare` shards;
* the same config on processes without a GPU, which accelerate runs as plain multi-CPU (it only ever selects FSDP for
  accelerator devices): `shard` applies `fully_shard` itself, over gloo, with the config's wrap and reshard settings.

Either way each process holds 1/world of every parameter, the (IA)^3 vectors included, between forward passes, and
the loop stays the one `ia3 train` runs on one process. What differs is gathered here, by collectives every process
calls in the same order: the vectors and their optimizer state are made whole for checkpoints and the final adapter
(a few hundred thousand numbers; the base is never gathered), and a checkpoint's whole tensors are cut back into each
process's shard on resume. A checkpoint is therefore the same files as one process writes, and resumes under any
launch.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ia3 import PeftModel


def fsdp_launch(accelerator: Accelerator) -> str | None:
    """How this run shards: "accelerate" (accelerate's FSDP2), "cpu" (FSDP asked of CPU processes) or None.

    Raises ValueError for FSDP version 1 (its flat parameters hold no whole vector to save or resume from) and for
    settings the CPU path cannot honour, before any weight is loaded.
    """
    kind = str(accelerator.distributed_type).split(".")[-1]
    if kind == "FSDP":
        if not getattr(accelerator, "is_fsdp2", False):
            raise ValueError(
                "ia3 train runs FSDP version 2 only (fully_shard): set `fsdp_version: 2` in the accelerate config, "
                "as configs/accelerate/fsdp.yaml does. FSDP version 1 keeps the (IA)^3 vectors inside flat "
                "parameters, from which the loop cannot checkpoint or resume them."
            )
        return "accelerate"
    from accelerate.utils import parse_flag_from_env

    if kind != "MULTI_CPU" or not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return None
    if os.environ.get("FSDP_VERSION", "1").strip() != "2":
        raise ValueError(
            "ia3 train runs FSDP version 2 only: set `fsdp_version: 2` in the accelerate config "
            "(configs/accelerate/fsdp.yaml), or FSDP_VERSION=2 in the environment"
        )
    unsupported = {
        "FSDP_OFFLOAD_PARAMS": "fsdp_offload_params (the parameters already live in CPU memory)",
        "FSDP_ACTIVATION_CHECKPOINTING": "fsdp_activation_checkpointing",
        "FSDP_CPU_RAM_EFFICIENT_LOADING": "fsdp_cpu_ram_efficient_loading (ia3 wraps the model after it loads)",
    }
    asked = [setting for env, setting in unsupported.items() if parse_flag_from_env(env)]
    if asked:
        raise ValueError(
            f"FSDP on CPU processes (gloo) does not support {', '.join(asked)}: set it to false in the accelerate "
            "config, or run on GPUs"
        )
    return "cpu"


def _wrap_classes(model) -> set[str]:
    """The block classes to shard one by one: the config's `fsdp_transformer_layer_cls_to_wrap` when given, else
    the model's `_no_split_modules` (what accelerate's TRANSFORMER_BASED_WRAP takes)."""
    named = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").strip()
    if named:
        return {name.strip() for name in named.split(",") if name.strip()}
    classes: set[str] = set()
    for module in model.modules():
        classes |= set(getattr(module, "_no_split_modules", None) or ())
    return classes


def shard(peft_model: PeftModel) -> int:
    """Shard the base model under `peft_model` across this process group, in place (FSDP2): each transformer block
    its own unit, the rest (embeddings, head, norms) the root's. Call before building the optimizer: sharding
    replaces the parameters. Returns the number of units."""
    from accelerate.utils import parse_flag_from_env
    from torch.distributed.fsdp import fully_shard

    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").strip().upper()
    if policy not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP", ""):
        raise ValueError(
            f"FSDP on CPU processes wraps by transformer block only: fsdp_auto_wrap_policy={policy} is not supported "
            "there; use TRANSFORMER_BASED_WRAP (or NO_WRAP: the whole model one unit)"
        )
    reshard = parse_flag_from_env("FSDP_RESHARD_AFTER_FORWARD", default=True)
    root = peft_model.get_base_model()
    classes = _wrap_classes(root) if policy == "TRANSFORMER_BASED_WRAP" else set()
    blocks = [m for m in root.modules() if m is not root and type(m).__name__ in classes]
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard)
    fully_shard(root, reshard_after_forward=reshard)
    return len(blocks) + 1


def _whole(tensor):
    """The whole tensor of a sharded one (a collective: every process calls it), else the tensor itself."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.full_tensor()
    return tensor


def adapter_state(peft_model: PeftModel, sharded: bool) -> dict[str, torch.Tensor] | None:
    """The trainable tensors made whole, under `peft_model.state_dict()`'s names, for `save_pretrained(state_dict=)`;
    None when nothing is sharded (the live parameters are whole). Every process calls it."""
    if not sharded:
        return None
    return {name: _whole(p.detach()) for name, p in peft_model.named_parameters() if p.requires_grad}


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded tensor made whole: the format one process writes. Every process
    calls it."""
    state = optimizer.state_dict()
    return {
        "state": {index: {k: _whole(v) for k, v in values.items()} for index, values in state["state"].items()},
        "param_groups": state["param_groups"],
    }


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A whole optimizer state (from a checkpoint) cut into the shards of `optimizer`'s parameters, so that
    `optimizer.load_state_dict` fits; unchanged for whole parameters. Each process cuts its own shard from the same
    whole tensors, without communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    fitted = {}
    for index, values in state["state"].items():
        param = params[int(index)]
        fitted[index] = {
            k: distribute_tensor(v.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
            if isinstance(param, DTensor) and isinstance(v, torch.Tensor) and v.shape == param.shape
            else v
            for k, v in values.items()
        }
    return {**state, "state": fitted}


def describe(model: nn.Module, launch: str, world: int) -> dict:
    """What this process holds of the model: for `metrics.json` and the start-up line."""
    from torch.distributed.tensor import DTensor

    held = total = 0
    for p in model.parameters():
        total += p.numel()
        held += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return {"launch": launch, "processes": world, "held_fraction": held / max(total, 1)}


def _root(model):
    """The outermost FSDP unit in `model` (None: nothing is sharded)."""
    from torch.distributed.fsdp import FSDPModule

    return next((m for m in model.modules() if isinstance(m, FSDPModule)), None)


class whole_root:
    """Within this context the root unit's weights (embeddings, head, final norms: what is not in a transformer
    block) stay gathered, so that code calling a part of the model directly works on a sharded model: generation of
    encoder-decoder models (transformers runs `get_encoder()` alone) and any evaluation helper. The blocks still
    gather and free their own weights at each forward. Every process enters it together; no-op without FSDP.

    Also settles which unit is the root before any forward has run (FSDP2 takes the first unit to run forward as
    the root, and a block called directly must not become one)."""

    def __init__(self, model: nn.Module) -> None:
        self.root = _root(model)
        self.reshards = True

    def __enter__(self) -> whole_root:
        if self.root is not None:
            state = self.root._get_fsdp_state()  # FSDP2 has no public call for this lazy initialisation
            state._lazy_init()
            groups = getattr(state, "_fsdp_param_groups", [])
            self.reshards = any(getattr(g, "post_forward_mesh_info", True) is not None for g in groups)
            self.root.set_reshard_after_forward(False, recurse=False)  # the root's own forwards keep them too
            self.root.unshard()
        return self

    def __exit__(self, *exc: object) -> bool:
        if self.root is not None:
            self.root.set_reshard_after_forward(self.reshards, recurse=False)
            self.root.reshard()
        return False
