"""Coverage-guided fuzzing of `IA3Config.from_dict` (and `from_pretrained` on the same bytes as a file).

Oracle: a config, or a ValueError/TypeError whose message names a key of the dict; a config round-trips through
`to_dict` / JSON and holds only well-typed fields.
    python fuzz/fuzz_config.py -atheris_runs=20000
"""

import contextlib
import json
import sys

import atheris
from common import FIELD_NAMES, json_value, write

with atheris.instrument_imports(include=["ia3"]):
    from ia3.config import IA3Config, TaskType


def check(data) -> None:
    try:
        config = IA3Config.from_dict(data)
    except (ValueError, TypeError) as err:
        message = str(err)
        if isinstance(data, dict):
            assert "peft_type" in message or any(f"{k!r}" in message or f"`{k}`" in message for k in data), message
        return
    assert isinstance(data, dict) and data["peft_type"] == "IA3"
    assert config.task_type is None or config.task_type in TaskType.__members__
    for name in ("fan_in_fan_out", "init_ia3_weights", "inference_mode"):
        assert isinstance(getattr(config, name), bool), name
    for name in ("target_modules", "exclude_modules", "feedforward_modules"):
        value = getattr(config, name)
        assert (
            value is None
            or isinstance(value, str)
            or (
                isinstance(value, list) and value == sorted(set(value)) and all(isinstance(v, str) and v for v in value)
            )
        ), name
    assert config.modules_to_save is None or all(isinstance(v, str) and v for v in config.modules_to_save)
    assert IA3Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    if mode == 0:  # the bytes as a JSON file
        raw = fdp.ConsumeBytes(fdp.remaining_bytes())
        folder = write("adapter_config.json", raw).parent
        with contextlib.suppress(ValueError, TypeError):
            IA3Config.from_pretrained(folder)
        return
    config = {"peft_type": "IA3"} if mode > 1 else {}
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        key = fdp.PickValueInList(FIELD_NAMES) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeUnicodeNoSurrogates(8)
        config[key] = json_value(fdp)
    check(config if mode else json_value(fdp))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
