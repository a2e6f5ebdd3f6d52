"""Shared fixtures and helpers. Everything runs offline on tiny models built from configs (tests/models.py)."""

from __future__ import annotations

import os

# never touch the network: transformers / huggingface_hub read these at import time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import ia3  # noqa: E402


def pytest_configure(config):
    # peft warns that it switches fan_in_fan_out on for GPT-2's Conv1D; expected, not a problem
    config.addinivalue_line("filterwarnings", "ignore:fan_in_fan_out is set to False:UserWarning")
    # peft looks for the base model's config when saving; offline and with made-up names it cannot, and says so
    config.addinivalue_line("filterwarnings", "ignore:Could not find a config file:UserWarning")


def ia3_layers(model: torch.nn.Module) -> dict[str, ia3.IA3Layer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ia3.IA3Layer)}


def peft_ia3_layers(model: torch.nn.Module) -> dict:
    from peft.tuners.ia3 import IA3Layer as PeftIA3Layer

    return {name: m for name, m in model.named_modules() if isinstance(m, PeftIA3Layer)}


def wrapped_shapes(model: torch.nn.Module, peft_side: bool = False) -> dict[str, tuple[int, ...]]:
    """module name (relative to the PeftModel) -> shape of each adapter vector, as `name/adapter`."""
    layers = peft_ia3_layers(model) if peft_side else ia3_layers(model)
    return {f"{name}/{a}": tuple(v.shape) for name, layer in layers.items() for a, v in layer.ia3_l.items()}


def randomize(peft_model: torch.nn.Module, adapter: str | None = None, seed: int = 0, spread: float = 0.5) -> None:
    """Give the adapter's vectors (all adapters when None) distinct random values around 1 (never ~0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".ia3_l." in name and (adapter is None or name.endswith(f".ia3_l.{adapter}")):
                p.copy_(1 + spread * (2 * torch.rand(p.shape, generator=g) - 1))


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every non-adapter parameter and buffer of a model, keyed by name with wrappers stripped."""
    out = {}
    for name, t in model.state_dict().items():
        if ".ia3_l." in name or ".modules_to_save." in name:
            continue
        out[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = t.detach().clone()
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"tensors differ: {bad[:5]}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
