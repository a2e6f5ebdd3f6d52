"""IA3Config: the JSON PEFT writes, strict parsing, validation, and never mutating the user's config."""

from __future__ import annotations

import dataclasses
import json

import models as M
import peft
import pytest

import ia3
from ia3.config import PEFT_FORMAT_VERSION
from ia3.targets import DEFAULT_FEEDFORWARD_MODULES, DEFAULT_TARGET_MODULES

SET_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules")


def _normalise(data: dict) -> dict:
    """PEFT keeps module-name lists as sets, so their JSON order is arbitrary; compare them sorted."""
    out = dict(data)
    for key in SET_FIELDS:
        if isinstance(out.get(key), list):
            out[key] = sorted(out[key])
    return out


CONFIG_CASES = [
    ("t5", {}),
    ("mt5", {}),
    ("bart", {}),
    ("gpt2", {}),
    ("llama", {}),
    ("bert", {}),
    ("t5", dict(target_modules=["k", "v", "wo"])),
    (
        "t5",
        dict(
            target_modules=["q", "wi"],
            feedforward_modules=["wi"],
            exclude_modules=["decoder.block.1.layer.0.SelfAttention.q"],
        ),
    ),
    ("t5", dict(target_modules=r".*\.(k|v)")),
    ("gpt2", dict(target_modules="all-linear")),
    ("llama", dict(target_modules="all-linear", feedforward_modules=["down_proj"])),
    ("bert", dict(target_modules=["query", "value"], modules_to_save=["pooler"], feedforward_modules=[])),
]


@pytest.mark.parametrize(("name", "kwargs"), CONFIG_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIG_CASES)])
def test_saved_config_json_equals_peft(name, kwargs, tmp_path):
    task = M.TASK[name]
    base_ours, base_theirs = M.ALL[name](), M.ALL[name]()
    base_ours.name_or_path = base_theirs.name_or_path = "org/base"  # both take base_model_name_or_path from here
    ours = ia3.get_peft_model(base_ours, ia3.IA3Config(task_type=task, **kwargs))
    theirs = peft.get_peft_model(base_theirs, peft.IA3Config(task_type=task, **kwargs))
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_json = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(mine) == set(peft_json)
    assert mine["base_model_name_or_path"] == "org/base"
    assert mine["peft_version"] == PEFT_FORMAT_VERSION
    mine.pop("peft_version"), peft_json.pop("peft_version")
    assert _normalise(mine) == _normalise(peft_json)
    # and to_dict (what save_pretrained writes, but with inference_mode as configured)
    in_memory = ours.peft_config["default"].to_dict()
    assert in_memory["inference_mode"] is False and mine["inference_mode"] is True
    in_memory["inference_mode"] = True
    in_memory.pop("peft_version")
    assert in_memory == mine


def test_to_dict_round_trip_and_peft_keys():
    config = ia3.IA3Config(
        task_type="CAUSAL_LM",
        target_modules=["v", "k"],
        feedforward_modules=["k"],
        modules_to_save=["score", "lm_head"],
        revision="main",
    )
    data = config.to_dict()
    assert set(data) == set(peft.IA3Config().to_dict())
    assert data["target_modules"] == ["k", "v"]
    assert data["modules_to_save"] == ["score", "lm_head"]  # user order kept, as PEFT writes it
    assert data["peft_type"] == "IA3" and data["auto_mapping"] is None
    json.dumps(data)  # plain JSON types only
    assert ia3.IA3Config.from_dict(data) == config
    # enums are accepted and stored as strings
    enum_config = ia3.IA3Config(task_type=ia3.TaskType.SEQ_CLS, peft_type=ia3.PeftType.IA3)
    assert enum_config.task_type == "SEQ_CLS" and enum_config.peft_type == "IA3"


def test_from_dict_reads_peft_written_config(tmp_path):
    theirs = peft.get_peft_model(M.gpt2(), peft.IA3Config(task_type="CAUSAL_LM"))
    theirs.save_pretrained(tmp_path)
    config = ia3.IA3Config.from_pretrained(tmp_path)
    assert config.task_type == "CAUSAL_LM"
    assert config.target_modules == ["c_attn", "mlp.c_proj"]
    assert config.feedforward_modules == ["mlp.c_proj"]
    assert config.fan_in_fan_out is True and config.inference_mode is True
    # kwargs override fields
    assert ia3.IA3Config.from_pretrained(tmp_path, inference_mode=False).inference_mode is False


def test_from_dict_warns_and_ignores_unknown_key():
    """Keys of a newer PEFT (or of another method's config) are dropped with a warning, as PEFT does."""
    config = ia3.IA3Config(task_type="SEQ_2_SEQ_LM")
    data = config.to_dict()
    data["lora_alpha"] = 16
    with pytest.warns(UserWarning, match="lora_alpha"):
        assert ia3.IA3Config.from_dict(data) == config


@pytest.mark.parametrize("peft_type", ["LORA", "PREFIX_TUNING", None])
def test_from_dict_refuses_other_peft_type(peft_type):
    data = ia3.IA3Config(task_type="SEQ_2_SEQ_LM").to_dict()
    data["peft_type"] = peft_type
    with pytest.raises(ValueError, match=repr(peft_type)):
        ia3.IA3Config.from_dict(data)
    with pytest.raises(ValueError, match="peft_type"):
        ia3.IA3Config(peft_type="LORA")


def test_from_dict_refuses_unsupported_set_keys():
    data = ia3.IA3Config().to_dict()
    data["layers_to_transform"] = [0, 1]
    with pytest.raises(ValueError, match="layers_to_transform"):
        ia3.IA3Config.from_dict(data)
    data["layers_to_transform"] = None  # PEFT-written null is fine
    assert ia3.IA3Config.from_dict(data).peft_type == "IA3"


def test_from_dict_needs_an_object():
    with pytest.raises(ValueError, match="JSON object"):
        ia3.IA3Config.from_dict(["IA3"])


def test_feedforward_not_subset_raises():
    with pytest.raises(ValueError, match=r"subset of `target_modules`.*\['wi'\]"):
        ia3.IA3Config(target_modules=["k", "v"], feedforward_modules=["wi"])
    # a regex target cannot be checked, and is accepted
    assert ia3.IA3Config(target_modules=r".*\.k", feedforward_modules=["wi"]).feedforward_modules == ["wi"]
    # the oracle refuses it too
    with pytest.raises(ValueError, match="subset"):
        peft.IA3Config(target_modules=["k", "v"], feedforward_modules=["wi"])


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        (dict(task_type="TRANSLATION"), "task_type"),
        (dict(target_modules=3), "target_modules"),
        (dict(target_modules=["k", ""]), "target_modules"),
        (dict(exclude_modules=[1]), "exclude_modules"),
        (dict(modules_to_save="classifier"), "modules_to_save"),
        (dict(init_ia3_weights="yes"), "init_ia3_weights"),
        (dict(fan_in_fan_out=1), "fan_in_fan_out"),
        (dict(base_model_name_or_path=5), "base_model_name_or_path"),
    ],
)
def test_invalid_fields_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ia3.IA3Config(**kwargs)


def test_default_tables_are_consistent_and_equal_peft():
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as PEFT_FF,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT_TARGETS,
    )

    for model_type, targets in DEFAULT_TARGET_MODULES.items():
        assert set(DEFAULT_FEEDFORWARD_MODULES[model_type]) <= set(targets), model_type
        if model_type in PEFT_TARGETS:
            assert set(targets) == set(PEFT_TARGETS[model_type]), model_type
            assert set(DEFAULT_FEEDFORWARD_MODULES[model_type]) == set(PEFT_FF[model_type]), model_type


def _fields(**given) -> dict:
    """What an `IA3Config(**given)` holds, built from the dataclass defaults and the arguments (not from a config)."""
    return {**{f.name: f.default for f in dataclasses.fields(ia3.IA3Config)}, **given}


@pytest.mark.parametrize("name", ["t5", "gpt2", "bert"])
def test_get_peft_model_does_not_mutate_user_config(name):
    config = ia3.IA3Config(task_type=M.TASK[name])
    model = ia3.get_peft_model(M.ALL[name](), config)
    # still exactly what the user wrote: compared with the arguments, and with a config built again from them
    assert dataclasses.asdict(config) == _fields(task_type=M.TASK[name])
    assert config == ia3.IA3Config(task_type=M.TASK[name])
    assert config.target_modules is None and config.feedforward_modules is None
    assert config.base_model_name_or_path is None and config.fan_in_fan_out is False
    # the stored config is resolved (defaults filled in), and is a different object
    stored = model.peft_config["default"]
    assert stored is not config
    model_type = M.ALL[name]().config.model_type
    assert stored.target_modules == sorted(DEFAULT_TARGET_MODULES[model_type])
    assert stored.fan_in_fan_out is (name == "gpt2")  # Conv1D targets
    # adding the same config object as a second adapter leaves it alone too
    model.add_adapter("other", config)
    assert dataclasses.asdict(config) == _fields(task_type=M.TASK[name])


def test_all_linear_config_not_mutated_and_resolved():
    given = dict(task_type="CAUSAL_LM", target_modules="all-linear", feedforward_modules=["down_proj"])
    config = ia3.IA3Config(**given)
    model = ia3.get_peft_model(M.llama(), config)
    assert dataclasses.asdict(config) == _fields(**given)
    assert config == ia3.IA3Config(**given)
    resolved = model.peft_config["default"].target_modules
    assert isinstance(resolved, list) and "model.layers.0.mlp.down_proj" in resolved
    assert not any(n.endswith("lm_head") for n in resolved)
    # the resolved config survives a JSON round trip (validation accepts full names covering "down_proj")
    assert ia3.IA3Config.from_dict(model.peft_config["default"].to_dict()) == model.peft_config["default"]
