"""Coverage-guided fuzzing of `ia3.serialization.load_tensors` on mutated safetensors files.

Oracle: a ValueError naming the file, or exactly the tensors the (mutated) header declares, with its dtypes and shapes
and the file's bytes.
    python fuzz/fuzz_safetensors.py -atheris_runs=20000
"""

import struct
import sys

import atheris
import torch
from common import safetensors_header, write
from safetensors.torch import save

with atheris.instrument_imports(include=["ia3"]):
    from ia3.serialization import load_tensors

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
]
ST = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def build(fdp) -> bytes:
    tensors = {}
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        name = fdp.ConsumeUnicodeNoSurrogates(10) or "t"
        shape = [fdp.ConsumeIntInRange(0, 4) for _ in range(fdp.ConsumeIntInRange(0, 3))]
        tensors[name if name != "__metadata__" else "m"] = (torch.rand(shape) * 8).to(fdp.PickValueInList(DTYPES))
    data = bytearray(save(tensors))
    n = struct.unpack("<Q", data[:8])[0]
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        op = fdp.ConsumeIntInRange(0, 4)
        if not data:
            break
        if op == 0:  # truncate
            data = data[: fdp.ConsumeIntInRange(0, len(data) - 1)]
        elif op == 1:  # flip a byte anywhere
            i = fdp.ConsumeIntInRange(0, len(data) - 1)
            data[i] ^= fdp.ConsumeIntInRange(1, 255)
        elif op == 2:  # flip a byte of the header
            i = fdp.ConsumeIntInRange(0, min(len(data), 8 + n) - 1)
            data[i] ^= fdp.ConsumeIntInRange(1, 255)
        elif op == 3:  # a new length field
            data[:8] = struct.pack("<Q", fdp.ConsumeIntInRange(0, 2**64 - 1))
        else:  # splice fuzzer bytes into the header
            i = fdp.ConsumeIntInRange(8, max(8, min(len(data), 8 + n)))
            chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16))
            data[i : i + len(chunk)] = chunk
    return bytes(data)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    raw = build(fdp) if fdp.ConsumeIntInRange(0, 4) else fdp.ConsumeBytes(fdp.remaining_bytes())
    path = write("adapter_model.safetensors", raw)
    try:
        tensors = load_tensors(path)
    except ValueError as err:
        assert str(path) in str(err)
        return
    n, header = safetensors_header(raw)
    header.pop("__metadata__", None)
    assert set(tensors) == set(header)
    for name, tensor in tensors.items():
        entry = header[name]
        assert list(tensor.shape) == entry["shape"] and tensor.dtype == ST[entry["dtype"]], name
        begin, end = entry["data_offsets"]
        assert tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() == raw[8 + n + begin : 8 + n + end]


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
