"""Coverage-guided fuzzing of `IA3Config.from_dict` (and `from_pretrained` on the same bytes as a file).

Oracle: a config, or a ValueError/TypeError whose message names the culprit: a wrong `peft_type` with its value,
else keys of the dict that are to blame (without them the dict loads, or is refused with another message); a config
round-trips through `to_dict` / JSON and holds only well-typed fields. `from_pretrained` on the bytes as a file agrees
with `from_dict` on the parsed JSON.
    python fuzz/fuzz_config.py -atheris_runs=20000
"""

import json
import sys
import warnings

import atheris
from common import FIELD_NAMES, json_value, write

with atheris.instrument_imports(include=["ia3"]):
    from ia3.config import IA3Config, TaskType


def _load(data) -> IA3Config:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown keys are dropped with a warning, not refused
        return IA3Config.from_dict(data)


def check_refusal(data, message: str) -> None:
    """A refusal names its culprit, so that a message naming nothing, or an innocent key, fails."""
    if not isinstance(data, dict):
        assert "JSON object" in message, message
        return
    if data.get("peft_type") != "IA3":
        assert "peft_type" in message and repr(data.get("peft_type")) in message, message
        return
    named = [k for k in data if k != "peft_type" and (f"`{k}`" in message or f"{k}=" in message)]
    assert named, f"{message!r} names no key of {list(data)}"
    try:
        _load({k: v for k, v in data.items() if k not in named})
    except (ValueError, TypeError) as again:
        assert str(again) != message, f"{message!r} blames {named}, but the dict without them is refused alike"


def check(data) -> None:
    try:
        config = _load(data)
    except (ValueError, TypeError) as err:
        check_refusal(data, str(err))
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
        try:
            parsed = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            parsed = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = IA3Config.from_pretrained(folder)
        except (ValueError, TypeError) as err:
            if parsed is None:
                assert "is not valid JSON" in str(err), str(err)
            elif isinstance(parsed, dict):
                parsed.pop("runtime_config", None)  # dropped with a warning, as PEFT does
                check_refusal(parsed, str(err))
            return
        assert isinstance(parsed, dict), parsed
        parsed.pop("runtime_config", None)
        assert loaded == _load(parsed)
        return
    config = {"peft_type": "IA3"} if mode > 1 else {}
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        key = fdp.PickValueInList(FIELD_NAMES) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeUnicodeNoSurrogates(8)
        config[key] = json_value(fdp)
    check(config if mode else json_value(fdp))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
