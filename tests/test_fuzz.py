"""Property-based fuzzing (hypothesis) of the entry points that read untrusted input.

* `IA3Config.from_dict`: any JSON-like dict gives a config that says exactly what the dict said, or a ValueError /
  TypeError whose message names the offending key (and the bad value); nothing else. Keys no (IA)^3 config has
  (a newer PEFT's) are dropped with a UserWarning that names each of them, as PEFT does.
* `load_tensors` on mutated safetensors bytes (truncation, byte flips, garbage headers and length fields): a
  ValueError, or tensors with exactly the header's names, dtypes and shapes, holding the file's bytes.
* `PeftModel.load_adapter_state_dict` with random key sets, shapes and dtypes: all or nothing; a refusal is a
  ValueError naming a bad key and leaves the model as it was.
* The dataset parsers and `load_examples` on random and half-structured files: `Examples` that hold together, or a
  `DataError`.

A fast slice by default (fixed seeds, about 4,000 cases, well under 30 s); set IA3_FUZZ_SCALE=10 (or more) for a
longer run with fresh seeds. Coverage-guided versions of the same targets live in fuzz/ (atheris).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes

from ia3 import IA3Config, get_peft_model
from ia3.config import _IGNORED_KEYS, TaskType, names_overlap
from ia3.recipe.data import (
    PHRASEBANK_LABELS,
    DataError,
    Examples,
    decode_text_file,
    load_examples,
    parse_phrasebank,
)
from ia3.serialization import load_tensors

SCALE = float(os.environ.get("IA3_FUZZ_SCALE", "1"))


def fuzz(n: int):
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        database=None,
        derandomize=SCALE <= 1,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
        ],
    )


# -- IA3Config.from_dict ----------------------------------------------------------------------------------------------
FIELDS = {f.name: f.default for f in dataclasses.fields(IA3Config)}
NAME_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules")
BOOL_FIELDS = ("fan_in_fan_out", "init_ia3_weights", "inference_mode")
STR_FIELDS = ("base_model_name_or_path", "revision")

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8
)
module_names = st.sampled_from(
    [
        "q",
        "v",
        "k",
        "o",
        "wo",
        "wi",
        "fc1",
        "lm_head",
        "encoder.block.0.layer.1.DenseReluDense.wo",
        "all-linear",
        "ALL-Linear",
        ".*q",
        "",
    ]
) | st.text(max_size=8)
name_values = st.none() | module_names | st.lists(module_names, max_size=4) | st.lists(json_scalars, max_size=3)
field_values = {
    "task_type": st.none() | st.sampled_from([t.value for t in TaskType] + ["seq_cls", "LORA", ""]) | json_values,
    "peft_type": st.just("IA3") | st.sampled_from(["LORA", "ia3", ""]) | json_values,
    "target_modules": name_values | json_values,
    "exclude_modules": name_values | json_values,
    "feedforward_modules": name_values | json_values,
    "modules_to_save": name_values | json_values,
    "fan_in_fan_out": st.booleans() | json_values,
    "init_ia3_weights": st.booleans() | json_values,
    "inference_mode": st.booleans() | json_values,
    "base_model_name_or_path": st.none() | st.text(max_size=10) | json_values,
    "revision": st.none() | st.text(max_size=10) | json_values,
    **{k: st.none() | json_values for k in _IGNORED_KEYS},
}
config_dicts = st.fixed_dictionaries(
    {"peft_type": st.just("IA3") | field_values["peft_type"]},
    optional={
        **{k: v for k, v in field_values.items() if k != "peft_type"},
        "lora_alpha": json_values,
        "r": json_values,
    },
) | st.dictionaries(st.text(max_size=10), json_values, max_size=4)


def _bad_names(value, key: str):
    """How the message shows a bad module-name field's value; None when the value is fine."""
    if isinstance(value, list):
        bad = [v for v in value if not isinstance(v, str) or not v]
        return repr(bad) if bad else None
    if value is None or isinstance(value, str):
        return repr(value) if key == "modules_to_save" and isinstance(value, str) else None
    return repr(value)


def _verdict(data: dict) -> tuple[dict | None, list[list[tuple[str, str]]]]:
    """(fields, []) for a dict that must load, field by field; else (None, culprits): the stages of checks that
    refuse it, each a list of (key, how the message shows the offending value)."""
    stages = []
    if data.get("peft_type") != "IA3":
        stages.append([("peft_type", repr(data.get("peft_type")))])
    unsupported = [
        (k, repr(data[k])) for k in ("target_parameters", "layers_to_transform", "layers_pattern") if data.get(k)
    ]
    if unsupported:
        stages.append(unsupported)
    out = {k: data.get(k, default) for k, default in FIELDS.items()}
    problems = []
    if out["task_type"] is not None and out["task_type"] not in [t.value for t in TaskType]:
        problems.append(("task_type", repr(out["task_type"])))
    for key in (*NAME_FIELDS, "modules_to_save"):
        shown = _bad_names(out[key], key)
        if shown is not None:
            problems.append((key, shown))
        elif isinstance(out[key], list):
            out[key] = list(dict.fromkeys(out[key])) if key == "modules_to_save" else sorted(set(out[key]))
    problems += [(k, repr(out[k])) for k in BOOL_FIELDS if not isinstance(out[k], bool)]
    problems += [(k, repr(out[k])) for k in STR_FIELDS if out[k] is not None and not isinstance(out[k], str)]
    if isinstance(out["target_modules"], str) and out["target_modules"].lower() == "all-linear":
        out["target_modules"] = "all-linear"
    ff, targets = out["feedforward_modules"], out["target_modules"]
    names_ok = not any(k in ("target_modules", "feedforward_modules") for k, _ in problems)
    if names_ok and isinstance(ff, list) and isinstance(targets, list):  # checked only when both are valid lists
        extra = sorted(f for f in ff if not names_overlap(f, targets))
        if extra:
            problems.append(("feedforward_modules", repr(extra)))
    if problems:
        stages.append(problems)
    return (None, stages) if stages else (out, [])


ALLOWED = str(sorted(FIELDS))  # the list of allowed fields that an unknown-key message ends with


def _shows(message: str, key: str, shown: str) -> bool:
    """One line of the message names field `key` (as `key` or key=) and shows the offending value right after
    "got ", "got <a word or two> ", "=" or "; " (so a short repr such as 0 or '' counts only in that place)."""
    value_at = re.compile(r"(?:\bgot (?:[a-z]+ ){0,2}|=|; )" + re.escape(shown))
    return any((f"`{key}`" in line or f"{key}=" in line) and value_at.search(line) for line in message.split("\n"))


def _quotes(message: str, key: str, data: dict) -> bool:
    """The message names unknown key `key` quoted (its repr), not only inside the list of allowed fields and not
    only inside the repr of another key of `data`: so "" and one-character keys count only when named themselves."""
    text = message.replace(ALLOWED, "")
    for other in sorted((repr(k) for k in data if k != key), key=len, reverse=True):
        if repr(key) in other:
            text = text.replace(other, "")
    return repr(key) in text


def _names_culprits(message: str, stages: list[list[tuple[str, str]]], data: dict) -> bool:
    """True when the message names every culprit of one stage of checks (of the unsupported keys, one is enough)."""
    for stage in stages:
        named = [_shows(message, key, shown) for key, shown in stage]
        if all(named) or (stage[0][0] in _IGNORED_KEYS and any(named)):
            return True
    return False


def _unknown_keys(data: dict) -> list:
    return sorted(set(data) - set(FIELDS) - _IGNORED_KEYS, key=repr)


def _names_unknown(message: str, data: dict) -> bool:
    """True when a warning's message quotes every unknown key of `data`."""
    return all(_quotes(message, key, data) for key in _unknown_keys(data))


def check_config(data) -> IA3Config | None:
    expected, stages = _verdict(data) if isinstance(data, dict) else (None, [])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = IA3Config.from_dict(data)
    except (ValueError, TypeError) as err:
        assert expected is None, f"a valid config was refused: {err}"
        message = str(err)
        if isinstance(data, dict):  # the message names the culprit (not e.g. "unhashable type: 'list'")
            assert _names_culprits(message, stages, data), f"{message!r} names none of {stages}"
        else:
            assert "JSON object" in message and f"got {type(data).__name__}" in message, message
        return None
    assert expected is not None, f"an invalid config was accepted: {data!r} -> {config!r}"
    assert dataclasses.asdict(config) == expected  # says exactly what the dict said
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if _unknown_keys(data):  # dropped, and said so
        assert len(messages) == 1 and _names_unknown(messages[0], data), (messages, _unknown_keys(data))
    else:
        assert not messages, messages
    again = IA3Config.from_dict(json.loads(json.dumps(config.to_dict())))  # and round-trips through JSON
    assert again == config
    return config


@fuzz(1500)
@given(config_dicts)
def test_fuzz_config_from_dict(data):
    check_config(data)


@fuzz(100)
@given(json_values)
def test_fuzz_config_from_non_dicts(data):
    check_config(data)


def test_config_warnings_name_short_and_empty_keys():
    """Unknown keys of zero or one character (and quotes) are named as themselves, quoted."""
    for key in ["", "r", "'", "`", '"', "a'"]:
        data = {"peft_type": "IA3", key: 1}
        with pytest.warns(UserWarning) as caught:
            IA3Config.from_dict(data)
        assert _quotes(str(caught[0].message), key, data), (key, str(caught[0].message))


@pytest.mark.parametrize(
    ("data", "message", "names"),
    [
        ({"peft_type": "IA3", "r": 1}, f"Unknown key(s) in the adapter config; (IA)^3 configs accept {ALLOWED}", False),
        (
            {"peft_type": "IA3", "r": 1},
            f"Unknown key(s) ['r'] in the adapter config; (IA)^3 configs accept {ALLOWED}",
            True,
        ),
        (
            {"peft_type": "IA3", "": 1},
            f"Unknown key(s) in the adapter config; accept {ALLOWED} (see '' in the docs)",
            True,
        ),
        (
            {"peft_type": "IA3", "r": 1, "'r'": 2},
            "Unknown key(s) [" + repr("'r'") + "]",
            False,
        ),  # 'r' only inside "'r'"
        ({"peft_type": 3}, "This adapter has the wrong peft_type; ia3 loads only peft_type 'IA3'", False),
        ({"peft_type": 3}, "This adapter has peft_type=3; ia3 loads only (IA)^3 adapters", True),
        (
            {"peft_type": "IA3", "fan_in_fan_out": 0, "revision": 1},
            "Invalid:\n  - `fan_in_fan_out` must be a bool",
            False,
        ),
        ({"peft_type": "IA3", "fan_in_fan_out": 0, "revision": 1}, "Invalid:\n  - `fan_in_fan_out` ...; got 0", False),
        (
            {"peft_type": "IA3", "fan_in_fan_out": 0, "revision": 1},
            "Invalid:\n  - `fan_in_fan_out` got 1\n  - `revision` got 0",
            False,
        ),
        (
            {"peft_type": "IA3", "fan_in_fan_out": 0, "revision": 1},
            "Invalid:\n  - `fan_in_fan_out` got 0\n  - `revision` got 1",
            True,
        ),
    ],
)
def test_config_oracle_refuses_messages_that_miss_the_culprit(data, message, names):
    """The fuzz oracle itself: a match inside the list of allowed fields, or inside another key, or a field named
    without its value (or with another field's value) does not count. (Unknown keys are warned about, not refused:
    the oracle checks the warning.)"""
    stages = _verdict(data)[1]
    assert (_names_culprits(message, stages, data) if stages else _names_unknown(message, data)) is names


# -- load_tensors on mutated safetensors bytes -------------------------------------------------------------------------
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
ST_DTYPES = {
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


@st.composite
def safetensors_files(draw) -> bytes:
    n = draw(st.integers(1, 3))
    tensors = {}
    for _ in range(n):
        name = draw(st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__"))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        dtype = draw(st.sampled_from(DTYPES))
        tensors[name] = (torch.rand(shape) * 8).to(dtype)
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
    return safetensors_bytes(tensors, metadata=metadata)


def _header(data: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


header_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*ST_DTYPES, "F8_E8M0", "F4", "F6_E2M3", "C64", "X", ""]) | json_scalars,
        "shape": st.lists(st.integers(-2, 6) | st.sampled_from([2**31, 2**62, 2**64]), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-1, 300) | st.sampled_from([2**63, 2**64 + 1]), max_size=3) | json_values,
    }
)


@st.composite
def mutated_files(draw) -> bytes:
    data = bytearray(draw(safetensors_files()))
    n, _ = _header(bytes(data))
    kind = draw(
        st.sampled_from(["truncate", "flip", "flip_header", "garbage_header", "json_header", "length", "append", "raw"])
    )
    if kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind in ("flip", "flip_header"):
        hi = 8 + n if kind == "flip_header" else len(data)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, hi - 1))
            data[i] ^= draw(st.integers(1, 255))
    elif kind == "garbage_header":
        data[8 : 8 + n] = draw(st.binary(min_size=n, max_size=n))
    elif kind == "json_header":
        header = draw(st.dictionaries(st.text(max_size=6), header_entries | json_values, max_size=3))
        raw = json.dumps(header).encode()
        body = draw(st.binary(max_size=64))
        data = bytearray(struct.pack("<Q", len(raw)) + raw + body)
    elif kind == "length":
        data[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1) | st.integers(0, len(data) + 8)))
    elif kind == "append":
        data += draw(st.binary(min_size=1, max_size=16))
    else:
        data = bytearray(draw(st.binary(max_size=200)))
    return bytes(data)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def check_load_tensors(path: Path, data: bytes) -> dict | None:
    path.write_bytes(data)
    try:
        tensors = load_tensors(path)
    except ValueError as err:
        assert str(path) in str(err)
        return None
    # loaded: what the (possibly mutated) header says, with the file's bytes
    n, header = _header(data)
    header.pop("__metadata__", None)
    assert set(tensors) == set(header)
    for name, tensor in tensors.items():
        entry = header[name]
        assert list(tensor.shape) == entry["shape"], name
        assert tensor.dtype == ST_DTYPES[entry["dtype"]], name
        begin, end = entry["data_offsets"]
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert raw == data[8 + n + begin : 8 + n + end], name
    return tensors


@fuzz(800)
@given(mutated_files())
def test_fuzz_load_tensors(scratch, data):
    check_load_tensors(scratch / "adapter_model.safetensors", data)


@fuzz(100)
@given(safetensors_files())
def test_fuzz_load_tensors_roundtrip(scratch, data):
    assert check_load_tensors(scratch / "adapter_model.safetensors", data) is not None


# -- PeftModel.load_adapter_state_dict -----------------------------------------------------------------------------------
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(6, 4)
        self.v = torch.nn.Linear(4, 5)
        self.ff = torch.nn.Linear(5, 3)
        self.head = torch.nn.Linear(3, 2)


@pytest.fixture(scope="module")
def adapter_model():
    torch.manual_seed(0)
    return get_peft_model(
        Net(), IA3Config(target_modules=["q", "v", "ff"], feedforward_modules=["ff"], modules_to_save=["head"])
    )


LOAD_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.float8_e4m3fn,
]


@st.composite
def state_dicts(draw, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in expected.items():
        if draw(st.integers(0, 9)) == 0:
            continue  # drop it
        shape = tuple(value.shape)
        if draw(st.integers(0, 7)) == 0:
            shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
        dtype = draw(st.sampled_from(LOAD_DTYPES)) if draw(st.integers(0, 7)) == 0 else torch.float32
        out[key] = (torch.rand(shape) + 0.5).to(dtype)
    for _ in range(draw(st.integers(0, 2)) if draw(st.integers(0, 3)) == 0 else 0):
        key = draw(
            st.sampled_from(
                [
                    *expected,
                    "base_model.model.q.ia3_l.default",
                    "q.ia3_l",
                    "base_model.model.k.ia3_l",
                    "base_model.model.head.original_module.weight",
                ]
            )
            | st.text(max_size=12)
        )
        if key in expected:
            key = key + draw(st.sampled_from([".x", "_", ".default"]))
        out[key] = torch.rand(tuple(draw(st.lists(st.integers(0, 4), max_size=2))))
    return out


@fuzz(400)
@given(st.data())
def test_fuzz_load_adapter_state_dict(adapter_model, data):
    expected = adapter_model.adapter_state_dict()
    tensors = data.draw(state_dicts(expected))
    before = {k: v.clone() for k, v in adapter_model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in adapter_model.named_parameters()}
    bad = sorted(set(tensors) ^ set(expected)) + sorted(
        k
        for k in set(tensors) & set(expected)
        if tensors[k].shape != expected[k].shape or not tensors[k].dtype.is_floating_point
    )
    try:
        adapter_model.load_adapter_state_dict(tensors, "default", "fuzz")
    except ValueError as err:
        assert bad, f"a fitting state dict was refused: {err}"
        message = str(err)

        def named(key: str) -> bool:
            # quoted (a list of keys) or opening a problem line: a short or empty key counts only where it is named
            return repr(key) in message or f"\n  - {key} has " in message

        assert any(named(k) for k in bad), f"the message names none of {bad[:3]}: {message}"
        for k in sorted(bad, key=lambda k: len(repr(k)), reverse=True):
            message = message.replace(repr(k), "").replace(f"\n  - {k} has ", "")
        named_good = [k for k in set(tensors) & set(expected) if k not in bad and named(k)]
        assert not named_good, f"the message blames fitting keys {named_good[:3]}: {err}"
        after = adapter_model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before), "a refused load changed the model"
    else:
        assert not bad, f"loaded a state dict with bad keys {bad}"
        state = adapter_model.adapter_state_dict()
        for key, value in tensors.items():
            assert torch.equal(state[key], value.to(state[key].dtype)), key
    assert {n: p.requires_grad for n, p in adapter_model.named_parameters()} == grads


# -- dataset parsers ----------------------------------------------------------------------------------------------------
LABEL_WORDS = [*PHRASEBANK_LABELS, "0", "1", "2", "7", "-1", "--1", "²", "١", "1_0", "True", " positive "]
texts = st.text(st.characters(codec="utf-8"), max_size=30)
labels = st.sampled_from(LABEL_WORDS) | st.text(max_size=6)


def check_examples(result) -> None:
    assert isinstance(result, Examples)
    assert len(result.texts) == len(result.labels) > 0
    assert all(isinstance(t, str) and t == t.strip() and t for t in result.texts)
    assert all(isinstance(y, int) and 0 <= y < len(result.label_names) for y in result.labels)
    assert len(set(result.labels)) >= 2
    assert all(isinstance(n, str) for n in result.label_names)


@fuzz(300)
@given(
    st.text(max_size=200)
    | st.lists(st.tuples(texts, st.sampled_from(["@", "@@", " @ ", ""]), labels)).map(
        lambda rows: "\n".join(s + a + y for s, a, y in rows)
    )
)
def test_fuzz_parse_phrasebank(text):
    try:
        rows = parse_phrasebank(text, "f.txt")
    except DataError as err:
        assert "f.txt, line " in str(err)
        return
    assert len(rows) == sum(1 for line in text.split("\n") if line.strip())
    for sentence, label in rows:
        assert sentence and label and sentence == sentence.strip() and label == label.strip() and "@" not in label


@fuzz(300)
@given(
    st.binary(max_size=100) | texts.map(lambda t: t.encode("utf-8")) | texts.map(lambda t: b"\xef\xbb\xbf" + t.encode())
)
def test_fuzz_decode_text_file(data):
    try:
        text = decode_text_file(data, "f")
    except DataError as err:
        assert "NUL" in str(err) and b"\x00" in data
        return
    assert "\r" not in text and "\x00" not in text
    body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    try:
        raw = body.decode("utf-8")
    except UnicodeDecodeError:
        raw = body.decode("latin-1")
    assert text == raw.replace("\r\n", "\n").replace("\r", "\n")


def _csv_field(value: str) -> str:
    return '"' + value.replace('"', '""') + '"' if any(c in value for c in ',"\n\r\t') else value


@st.composite
def data_files(draw) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from([".csv", ".tsv", ".jsonl", ".json", ".txt", ".parquet"]))
    if suffix == ".parquet" or draw(st.integers(0, 4)) == 0:
        return suffix, draw(st.binary(max_size=300))
    rows = draw(st.lists(st.tuples(texts, labels), max_size=8))
    if suffix in (".csv", ".tsv"):
        sep = "\t" if suffix == ".tsv" else ","
        header = draw(st.sampled_from(["text{s}label", "label{s}text", "text", "sentence{s}label", "text{s}label{s}x"]))
        body = [sep.join(_csv_field(v) for v in (t, y)) for t, y in rows]
        if draw(st.booleans()):
            body.append(draw(texts))  # a line with odd fields
        content = "\n".join([header.format(s=sep), *body])
    elif suffix == ".txt":
        content = "\n".join(f"{t}@{y}" for t, y in rows)
    else:
        records = [
            {"text": t, "label": draw(st.sampled_from([y, 0, 1, 2, 5, -1, True, None, 1.5, [1]]))} for t, y in rows
        ]
        records += draw(st.lists(json_values, max_size=2))
        if suffix == ".json" and draw(st.booleans()):
            content = json.dumps(records)
        else:
            content = "\n".join(json.dumps(r) for r in records)
    encoded = content.encode("utf-8")
    if draw(st.integers(0, 5)) == 0 and encoded:
        i = draw(st.integers(0, len(encoded) - 1))
        encoded = encoded[:i] + draw(st.binary(min_size=1, max_size=3)) + encoded[i + 1 :]
    return suffix, encoded


@fuzz(500)
@given(data_files(), st.none() | st.just(PHRASEBANK_LABELS) | st.just(["a", "b"]))
def test_fuzz_load_examples(scratch, file, label_names):
    suffix, content = file
    path = scratch / f"data{suffix}"
    path.write_bytes(content)
    try:
        result = load_examples(str(path), text_column="text", label_column="label", label_names=label_names)
    except DataError as err:
        assert str(path) in str(err), f"the error does not name the file: {err}"
        return
    check_examples(result)
    if label_names is not None:
        assert result.label_names == label_names


def test_huge_fields_and_deep_nesting_are_data_errors(tmp_path):
    """Cases random bytes rarely reach: a CSV field past the csv module's size limit, JSON nested deeper than the
    recursion limit, an integer with more digits than Python converts."""
    cases = {
        "big.csv": "text,label\n" + "x" * 200_000 + ",positive\n",
        "deep.jsonl": "[" * 100_000 + "\n",
        "deep.json": "[" + "[" * 100_000,
        "bigint.jsonl": '{"text": "a", "label": ' + "9" * 5000 + "}\n",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(DataError):
            load_examples(str(path), text_column="text")


def test_config_nan_and_inf_are_refused_cleanly():
    for value in (math.nan, math.inf):
        # cleanly: the message names the field and the value, not a comparison error of NaN
        with pytest.raises(ValueError, match=rf"`fan_in_fan_out` must be true or false; got {value!r}$"):
            IA3Config.from_dict({"peft_type": "IA3", "fan_in_fan_out": value})


def test_adapter_config_nested_too_deep_or_huge_ints_is_a_value_error(tmp_path):
    for text in ("[" * 100_000, '{"peft_type": "IA3", "revision": ' + "9" * 5000 + "}"):
        (tmp_path / "adapter_config.json").write_text(text)
        with pytest.raises(ValueError, match="is not valid JSON"):
            IA3Config.from_pretrained(tmp_path)
