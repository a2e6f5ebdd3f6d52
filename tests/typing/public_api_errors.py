"""Negative control for tests/test_typing.py: misuses of the public API that mypy must reject.

tests/test_typing.py asserts that mypy reports an error on exactly the lines marked `# error`, so the type check
can fail. Never run.

A misspelt method on a `PeftModel` *instance* passes mypy (it goes to `__getattr__`, the pass-through to the
wrapped model PEFT users rely on); on the class there is no pass-through, so that line checks the name.
"""

from __future__ import annotations

from torch import nn

from ia3 import IA3Layer, PeftModel, get_peft_model


def misuse(model: PeftModel, layer: IA3Layer) -> None:
    PeftModel.merge_adapterz(model)  # error: no such method
    model.set_adapter(3)  # error: not a name or list of names
    model.merge_adapter(adapter_names="default")  # error: a str, not a list of names
    count: int = model.merge_and_unload()  # error: returns an nn.Module
    with model.disable_adapter() as nothing:
        print(nothing.shape)  # error: the context manager yields None
    layer.merge(safe_merge="yes")  # error: not a bool
    layer.to_module(adapter_names=1)  # error: not a list of names
    get_peft_model(nn.Linear(2, 2), "ia3")  # error: not an IA3Config
    del count
