"""PEFT's words, checked against the real `peft` (the oracle): each case runs under ia3 and under peft on the same
tiny model, and ia3 must give the same exception or warning class with a message that starts with PEFT's (ia3 may
add a sentence after it). Also `peft_type` as PEFT's str enum and `from_json_file` dropping `runtime_config`."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import models as M
import peft
import pytest
import torch

import ia3

LIBS = {"ia3": ia3, "peft": peft}


def _model(lib, name: str = "bert", adapters: tuple[str, ...] = ("default",), **kwargs):
    """`name` wrapped by `lib` with the given adapters (same targets), default active."""
    task = M.TASK[name]
    model = lib.get_peft_model(M.ALL[name](), lib.IA3Config(task_type=task, **kwargs), adapter_name=adapters[0])
    for adapter in adapters[1:]:
        model.add_adapter(adapter, lib.IA3Config(task_type=task, **kwargs))
    return model


def _raised(fn: Callable[[], object]) -> BaseException:
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the class is compared with the oracle's
        fn()
    return caught.value


def _assert_same_error(ours: Callable[[], object], theirs: Callable[[], object]) -> None:
    expected, got = _raised(theirs), _raised(ours)
    assert isinstance(got, type(expected)), (type(got), type(expected), str(got))
    assert str(got).startswith(str(expected)), (str(got), str(expected))


def _warnings(fn: Callable[[], object]) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return list(caught)


def _assert_same_warning(ours: Callable[[], object], theirs: Callable[[], object]) -> None:
    expected = _warnings(theirs)
    assert expected, "the oracle gave no warning: the case tests nothing"
    got = _warnings(ours)
    first = expected[0]
    matching = [
        w for w in got if issubclass(w.category, first.category) and str(w.message).startswith(str(first.message))
    ]
    assert matching, ([str(w.message) for w in got], str(first.message))


# -- peft_type -------------------------------------------------------------------------------------------------------
def test_peft_type_is_peft_str_enum(tmp_path):
    ours, theirs = ia3.IA3Config(), peft.IA3Config()
    assert ours.peft_type == theirs.peft_type == "IA3"
    assert ours.peft_type.value == theirs.peft_type.value == "IA3"
    assert ia3.PeftType.IA3 == peft.PeftType.IA3
    assert isinstance(ours.peft_type, str) and isinstance(ours.peft_type, ia3.PeftType)
    assert ia3.IA3Config(peft_type="IA3").peft_type is ia3.PeftType.IA3  # the string becomes the enum
    model = _model(ia3, "t5")
    assert model.active_peft_config.peft_type.value == _model(peft, "t5").active_peft_config.peft_type.value
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "IA3"  # JSON unchanged
    loaded = ia3.IA3Config.from_pretrained(tmp_path)
    assert loaded.peft_type is ia3.PeftType.IA3


def test_task_type_kept_as_peft_keeps_it():
    # PEFT stores the task type as given; ia3 stores its string, which equals the enum either way
    for task in ("SEQ_CLS", peft.TaskType.SEQ_CLS):
        assert ia3.IA3Config(task_type=task).task_type == peft.IA3Config(task_type=task).task_type == "SEQ_CLS"


# -- config files ----------------------------------------------------------------------------------------------------
def _config_file(folder: Path, **changes) -> Path:
    data = ia3.IA3Config(task_type="SEQ_CLS", target_modules=["query"], feedforward_modules=[]).to_dict()
    data.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del data[key]
    folder.mkdir(exist_ok=True)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(data))
    return path


def test_from_json_file_drops_runtime_config(tmp_path):
    path = _config_file(tmp_path, runtime_config={"ephemeral_gpu_offload": True})
    _assert_same_warning(lambda: ia3.IA3Config.from_json_file(path), lambda: peft.IA3Config.from_json_file(path))
    with pytest.warns(UserWarning, match="runtime_config"):
        data = ia3.IA3Config.from_json_file(path)
    assert "runtime_config" not in data and data["peft_type"] == "IA3"
    with pytest.warns(UserWarning, match="runtime_config"):
        assert ia3.IA3Config.from_pretrained(tmp_path).target_modules == ["query"]


def test_unknown_config_keys_warn_in_peft_words(tmp_path):
    _config_file(tmp_path, lora_alpha=16, future_option=True)
    _assert_same_warning(
        lambda: ia3.IA3Config.from_pretrained(tmp_path), lambda: peft.IA3Config.from_pretrained(tmp_path)
    )
    _assert_same_warning(
        lambda: ia3.PeftConfig.from_pretrained(tmp_path), lambda: peft.PeftConfig.from_pretrained(tmp_path)
    )


def test_config_without_peft_type_is_a_type_error(tmp_path):
    _config_file(tmp_path, peft_type=None)
    _assert_same_error(
        lambda: ia3.PeftConfig.from_pretrained(tmp_path), lambda: peft.PeftConfig.from_pretrained(tmp_path)
    )
    with pytest.raises(ValueError, match="peft_type"):  # also a ValueError, as ia3's other refused configs
        ia3.PeftConfig.from_pretrained(tmp_path)


# -- adapters --------------------------------------------------------------------------------------------------------
def _per_lib(case: Callable[[object], object]) -> tuple[Callable[[], object], Callable[[], object]]:
    """(ours, theirs): `case(model)` on a fresh model of each library (built before the call)."""
    models = {name: case(lib) for name, lib in LIBS.items()}
    return models["ia3"], models["peft"]  # type: ignore[return-value]


def test_delete_unknown_adapter():
    def case(lib):
        model = _model(lib)
        return lambda: model.delete_adapter("nope")

    _assert_same_error(*_per_lib(case))


def test_delete_merged_adapter():
    def case(lib):
        model = _model(lib, adapters=("default", "other"))
        model.merge_adapter(["other"])
        return lambda: model.delete_adapter("other")

    _assert_same_error(*_per_lib(case))


def test_safe_merge_of_nan_vectors():
    def case(lib):
        model = _model(lib, "t5")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".ia3_l." in name:
                    param.fill_(float("nan"))
        return lambda: model.merge_adapter(safe_merge=True)

    _assert_same_error(*_per_lib(case))


def test_two_adapters_with_the_same_modules_to_save_cannot_be_active_together():
    def case(lib):
        model = _model(lib, adapters=("default", "other"))
        return lambda: model.base_model.set_adapter(["default", "other"])

    _assert_same_error(*_per_lib(case))


def test_weighted_adapter_over_the_same_modules_to_save():
    def case(lib):
        model = _model(lib, adapters=("default", "other"))
        return lambda: model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")

    _assert_same_error(*_per_lib(case))


def test_weighted_adapter_of_unknown_adapter():
    def case(lib):
        model = _model(lib, "t5")
        return lambda: model.add_weighted_adapter(["default", "nope"], [0.5, 0.5], "mix")

    _assert_same_error(*_per_lib(case))


@pytest.mark.parametrize("second", [None, ["default", "other"]], ids=["same", "additional"])
def test_repeated_merge_warns(second):
    def case(lib):
        model = _model(lib, "t5", adapters=("default", "other"))
        model.merge_adapter(["default"])
        return lambda: model.merge_adapter(second)

    _assert_same_warning(*_per_lib(case))


def test_seq2seq_generate_takes_keywords_only():
    def case(lib):
        model = _model(lib, "t5")
        ids = M.batch("t5")["input_ids"]
        return lambda: model.generate(ids, max_new_tokens=2)

    ours, theirs = _per_lib(case)
    _assert_same_error(ours, theirs)
    model = _model(ia3, "t5")
    out = model.generate(input_ids=M.batch("t5")["input_ids"], max_new_tokens=2)  # keywords work
    assert out.shape[0] == 3


def test_set_unknown_adapter():
    def case(lib):
        model = _model(lib, "t5")
        return lambda: model.set_adapter("nope")

    _assert_same_error(*_per_lib(case))


def test_add_adapter_under_a_taken_name():
    def case(lib):
        model = _model(lib, "t5")
        return lambda: model.add_adapter("default", lib.IA3Config(task_type="SEQ_2_SEQ_LM"))

    _assert_same_error(*_per_lib(case))


def test_save_pretrained_refusals(tmp_path):
    file = tmp_path / "a-file"
    file.write_text("x")

    def onto_a_file(lib):
        model = _model(lib, "t5")
        return lambda: model.save_pretrained(str(file))

    def unknown_selected(lib):
        model = _model(lib, "t5")
        return lambda: model.save_pretrained(str(tmp_path / lib.__name__), selected_adapters=["nope"])

    _assert_same_error(*_per_lib(onto_a_file))
    _assert_same_error(*_per_lib(unknown_selected))


def test_layer_status_of_a_model_without_adapters():
    def case(lib):
        plain = M.t5()
        return lambda: lib.get_layer_status(plain)

    _assert_same_error(*_per_lib(case))
