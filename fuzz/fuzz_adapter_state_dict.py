"""Coverage-guided fuzzing of `PeftModel.load_adapter_state_dict` with random key sets, shapes and dtypes.

Oracle: all or nothing. A state dict that fits (the adapter's keys, their shapes, floating dtypes) loads and the
vectors equal it; anything else raises a ValueError naming a bad key and leaves every tensor of the model unchanged.
    python fuzz/fuzz_adapter_state_dict.py -atheris_runs=20000
"""

import sys

import atheris
import torch

with atheris.instrument_imports(include=["ia3"]):
    from ia3 import IA3Config, get_peft_model


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(6, 4)
        self.v = torch.nn.Linear(4, 5)
        self.ff = torch.nn.Linear(5, 3)
        self.head = torch.nn.Linear(3, 2)


torch.manual_seed(0)
MODEL = get_peft_model(
    Net(), IA3Config(target_modules=["q", "v", "ff"], feedforward_modules=["ff"], modules_to_save=["head"])
)
EXPECTED = MODEL.adapter_state_dict()
DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.float8_e4m3fn,
    torch.uint8,
]
EXTRA_KEYS = [
    "base_model.model.q.ia3_l.default",
    "q.ia3_l",
    "base_model.model.k.ia3_l",
    "base_model.model.q.ia3_l.x",
    "base_model.model.head.original_module.weight",
    "",
]


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    tensors = {}
    for key, value in EXPECTED.items():
        if fdp.ConsumeIntInRange(0, 9) == 0:
            continue
        shape = tuple(value.shape)
        if fdp.ConsumeIntInRange(0, 5) == 0:
            shape = tuple(fdp.ConsumeIntInRange(0, 6) for _ in range(fdp.ConsumeIntInRange(0, 3)))
        dtype = fdp.PickValueInList(DTYPES) if fdp.ConsumeIntInRange(0, 5) == 0 else torch.float32
        tensors[key] = (torch.rand(shape) + 0.5).to(dtype)
    for _ in range(fdp.ConsumeIntInRange(0, 2) if fdp.ConsumeIntInRange(0, 3) == 0 else 0):
        key = fdp.PickValueInList(EXTRA_KEYS) if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(12)
        tensors[key] = torch.rand(tuple(fdp.ConsumeIntInRange(0, 4) for _ in range(fdp.ConsumeIntInRange(0, 2))))
    before = {k: v.clone() for k, v in MODEL.state_dict().items()}
    bad = sorted(set(tensors) ^ set(EXPECTED)) + sorted(
        k
        for k in set(tensors) & set(EXPECTED)
        if tensors[k].shape != EXPECTED[k].shape or not tensors[k].dtype.is_floating_point
    )
    try:
        MODEL.load_adapter_state_dict(tensors, "default", "fuzz")
    except ValueError as err:
        assert bad, f"a fitting state dict was refused: {err}"
        assert any(k in str(err) or repr(k) in str(err) for k in bad), str(err)  # named, maybe as a repr
        after = MODEL.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before), "a refused load changed the model"
        return
    assert not bad, bad
    state = MODEL.adapter_state_dict()
    for key, value in tensors.items():
        assert torch.equal(state[key], value.to(state[key].dtype)), key


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
