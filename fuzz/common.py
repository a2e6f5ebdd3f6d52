"""Shared by the atheris fuzzers: oracles for what each entry point may do with any input, and builders that turn the
fuzzer's bytes into structured input (JSON-like values, safetensors files) so that mutations reach past the first
check. Run a fuzzer as `python fuzz/fuzz_<target>.py -atheris_runs=20000` (other libFuzzer flags work too, e.g.
`-max_total_time=60`, a corpus folder as last argument). A finding is an uncaught exception: atheris prints it and
writes the input to `crash-<hash>` in the current folder.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

SCRATCH = Path(tempfile.mkdtemp(prefix="ia3-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)  # libFuzzer ends with sys.exit: atexit runs
MODULE_NAMES = ["q", "v", "k", "o", "wo", "wi", "fc1", "lm_head", "all-linear", "ALL-Linear", ".*q", "", "head"]
FIELD_NAMES = [
    "task_type",
    "peft_type",
    "target_modules",
    "exclude_modules",
    "feedforward_modules",
    "fan_in_fan_out",
    "modules_to_save",
    "init_ia3_weights",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
    "auto_mapping",
    "target_parameters",
    "layers_to_transform",
    "layers_pattern",
    "r",
]
TASKS = ["SEQ_2_SEQ_LM", "CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION", "LORA", "seq_cls"]


def json_value(fdp, depth: int = 0):
    """A JSON-like value (what json.loads can return), biased towards the shapes adapter configs have."""
    kind = fdp.ConsumeIntInRange(0, 9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeInt(4)
    if kind == 3:
        return fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.ConsumeFloat()
    if kind == 4:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 12))
    if kind == 5:
        return fdp.PickValueInList(MODULE_NAMES)
    if kind == 6:
        return fdp.PickValueInList(TASKS + ["IA3"])
    if kind in (7, 8):
        return [json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    return {fdp.ConsumeUnicodeNoSurrogates(6): json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))}


def safetensors_header(data: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def write(name: str, data: bytes) -> Path:
    path = SCRATCH / name
    path.write_bytes(data)
    return path
