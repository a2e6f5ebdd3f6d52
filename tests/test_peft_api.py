"""The rest of PEFT's public API, each call checked against the real `peft` (the oracle) on the same tiny model."""

from __future__ import annotations

import json
import warnings

import models as M
import peft
import pytest
import torch
import transformers as tf
import yaml
from conftest import randomize
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from tiny_dirs import DEMO, make_model_dir
from torch import nn

import ia3


def _pair(name: str = "bert", **kwargs):
    """The same tiny model wrapped by ia3 and by peft, with equal random vectors and head copies."""
    task = kwargs.pop("task_type", M.TASK[name])
    ours = ia3.get_peft_model(M.ALL[name](), ia3.IA3Config(task_type=task, **kwargs))
    theirs = peft.get_peft_model(M.ALL[name](), peft.IA3Config(task_type=task, **kwargs))
    randomize(ours)
    with torch.no_grad():
        for pname, p in ours.named_parameters():
            if ".modules_to_save." in pname:
                p.add_(0.2)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def _logits(model, name="bert"):
    with torch.no_grad():
        return model(**M.batch(name)).logits


def _assert_tensors_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


class MLP(nn.Module):
    """A custom (non-transformers) model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(8, 16)
        self.lin1 = nn.Linear(16, 4)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


# -- state dicts -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bert", "t5", "gpt2"])
def test_get_peft_model_state_dict_equals_peft(name):
    ours, theirs = _pair(name)
    mine = ia3.get_peft_model_state_dict(ours)
    _assert_tensors_equal(mine, peft.get_peft_model_state_dict(theirs))
    assert mine.keys() == ours.adapter_state_dict().keys()
    # from a full state dict (FSDP / ZeRO-3 style), keys as in model.state_dict()
    full = {k: v.clone() for k, v in ours.state_dict().items()}
    _assert_tensors_equal(ia3.get_peft_model_state_dict(ours, state_dict=full), peft.get_peft_model_state_dict(theirs))


def test_set_peft_model_state_dict_equals_peft():
    ours, theirs = _pair("bert")
    saved = peft.get_peft_model_state_dict(theirs)
    fresh_ours = ia3.get_peft_model(M.bert_cls(), ia3.IA3Config(task_type="SEQ_CLS"))
    fresh_theirs = peft.get_peft_model(M.bert_cls(), peft.IA3Config(task_type="SEQ_CLS"))
    result = ia3.set_peft_model_state_dict(fresh_ours, saved)
    expected = peft.set_peft_model_state_dict(fresh_theirs, saved)
    assert sorted(result.missing_keys) == sorted(expected.missing_keys)
    assert sorted(result.unexpected_keys) == sorted(expected.unexpected_keys) == []
    torch.testing.assert_close(_logits(fresh_ours), _logits(ours), atol=0, rtol=0)
    # a key that fits nothing comes back as unexpected, in both
    extra = {**saved, "base_model.model.nothing.ia3_l": torch.ones(1)}
    result = ia3.set_peft_model_state_dict(fresh_ours, extra)
    assert result.unexpected_keys == peft.set_peft_model_state_dict(fresh_theirs, extra).unexpected_keys


def test_inject_adapter_in_model_equals_peft():
    config = dict(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])
    ours = ia3.inject_adapter_in_model(ia3.IA3Config(**config), MLP())
    theirs = peft.inject_adapter_in_model(peft.IA3Config(**config), MLP())
    assert isinstance(ours, MLP) and set(ours.peft_config) == {"default"}
    assert set(ours.state_dict()) == set(theirs.state_dict())
    randomize(ours)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(ours(x), theirs(x), atol=0, rtol=0)
    saved = ia3.get_peft_model_state_dict(ours)
    _assert_tensors_equal(saved, peft.get_peft_model_state_dict(theirs))
    assert set(saved) == {"lin0.ia3_l", "lin1.ia3_l"}

    # targets from a state dict's keys; low_cpu_mem_usage: empty (meta) vectors, then assigned
    only = {"lin1.ia3_l": saved["lin1.ia3_l"]}
    lazy = ia3.inject_adapter_in_model(ia3.IA3Config(**config), MLP(), state_dict=only, low_cpu_mem_usage=True)
    lazy_theirs = peft.inject_adapter_in_model(peft.IA3Config(**config), MLP(), state_dict=only, low_cpu_mem_usage=True)
    assert set(lazy.state_dict()) == set(lazy_theirs.state_dict())
    assert lazy.lin1.ia3_l["default"].device.type == lazy_theirs.lin1.ia3_l["default"].device.type == "meta"
    result = ia3.set_peft_model_state_dict(lazy, only, low_cpu_mem_usage=True)
    assert result.unexpected_keys == []
    assert lazy.lin1.ia3_l["default"].device.type == "cpu"
    assert torch.equal(lazy.lin1.ia3_l["default"], saved["lin1.ia3_l"])


def test_base_model_state_dict_equals_peft():
    ours, theirs = _pair("bert")
    mine = ia3.get_base_model_state_dict(ours)
    _assert_tensors_equal(mine, peft.get_base_model_state_dict(theirs))
    assert set(mine) == set(M.bert_cls().state_dict())  # the keys of the model before wrapping
    # load other base weights under the original keys
    other = M.bert_cls(seed=1).state_dict()
    result = ia3.set_base_model_state_dict(ours, other)
    assert result == peft.set_base_model_state_dict(theirs, other) == ([], [])
    _assert_tensors_equal(ia3.get_base_model_state_dict(ours), dict(other))
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-6, rtol=0)
    # strict: a missing key is torch's RuntimeError, as in PEFT, and nothing is loaded
    partial = {k: v for k, v in other.items() if not k.startswith("classifier.")}
    with pytest.raises(RuntimeError, match="classifier.weight"):
        peft.set_base_model_state_dict(theirs, partial)
    with pytest.raises(RuntimeError, match="classifier.weight"):
        ia3.set_base_model_state_dict(ours, partial)
    loose = ia3.set_base_model_state_dict(ours, partial, strict=False)
    assert loose == peft.set_base_model_state_dict(theirs, partial, strict=False)


def test_load_peft_weights_equals_peft(tmp_path):
    ours, _ = _pair("t5")
    ours.save_pretrained(tmp_path)
    _assert_tensors_equal(ia3.load_peft_weights(tmp_path, device="cpu"), peft.load_peft_weights(str(tmp_path), "cpu"))
    mapping = {r"^encoder\.": "enc."}
    _assert_tensors_equal(
        ia3.load_peft_weights(tmp_path, device="cpu", key_mapping=mapping),
        peft.load_peft_weights(str(tmp_path), "cpu", key_mapping=mapping),
    )


def test_cast_mixed_precision_params_equals_peft():
    ours, theirs = _pair("bert")
    ia3.cast_mixed_precision_params(ours, torch.bfloat16)
    peft.cast_mixed_precision_params(theirs, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in ours.named_parameters()}
    assert dtypes == {n: p.dtype for n, p in theirs.named_parameters()}
    assert {dtypes[n] for n, p in ours.named_parameters() if p.requires_grad} == {torch.float32}
    assert torch.bfloat16 in dtypes.values()


# -- configs ---------------------------------------------------------------------------------------------------------
def test_peft_config_from_pretrained_and_from_peft_type(tmp_path):
    theirs = peft.get_peft_model(M.t5(), peft.IA3Config(task_type="SEQ_2_SEQ_LM", target_modules=["q", "wo"]))
    theirs.save_pretrained(tmp_path)
    config = ia3.PeftConfig.from_pretrained(tmp_path)
    assert type(config) is ia3.IA3Config and isinstance(config, ia3.PeftConfig)
    assert type(peft.PeftConfig.from_pretrained(str(tmp_path))).__name__ == "IA3Config"
    assert config.target_modules == ["q", "wo"] and config.task_type == "SEQ_2_SEQ_LM"
    assert ia3.IA3Config.from_pretrained(tmp_path) == config
    path = tmp_path / "adapter_config.json"
    assert (
        ia3.IA3Config.from_json_file(path) == peft.IA3Config.from_json_file(str(path)) == json.loads(path.read_text())
    )
    made = ia3.PeftConfig.from_peft_type(peft_type="IA3", target_modules=["q"], task_type="SEQ_2_SEQ_LM")
    assert made == ia3.IA3Config(target_modules=["q"], task_type="SEQ_2_SEQ_LM")
    assert type(peft.PeftConfig.from_peft_type(peft_type="IA3", target_modules=["q"])).__name__ == "IA3Config"
    with pytest.raises(ValueError, match="'LORA'"):
        ia3.PeftConfig.from_peft_type(peft_type="LORA", r=8)


def test_config_keys_of_a_newer_peft_warn_and_are_ignored(tmp_path):
    theirs = peft.get_peft_model(M.t5(), peft.IA3Config(task_type="SEQ_2_SEQ_LM"))
    theirs.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "future_option": 3}))
    with pytest.warns(UserWarning, match="future_option"):
        peft.PeftConfig.from_pretrained(str(tmp_path))  # the oracle: PEFT warns and loads
    with pytest.warns(UserWarning, match="future_option"):
        config = ia3.PeftConfig.from_pretrained(tmp_path)
    assert not hasattr(config, "future_option")
    with pytest.warns(UserWarning, match="future_option"):
        loaded = ia3.PeftModel.from_pretrained(M.t5(), tmp_path)
    torch.testing.assert_close(_logits(loaded, "t5"), _logits(theirs, "t5"), atol=1e-6, rtol=0)


def test_get_peft_model_revision_and_low_cpu_mem_usage(tmp_path):
    config = ia3.IA3Config(task_type="CAUSAL_LM")
    ours = ia3.get_peft_model(M.gpt2(), config, revision="v2")
    theirs = peft.get_peft_model(M.gpt2(), peft.IA3Config(task_type="CAUSAL_LM"), revision="v2")
    assert ours.peft_config["default"].revision == theirs.peft_config["default"].revision == "v2"
    assert config.revision is None  # the user's config is not mutated
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["revision"] == "v2"
    lazy = ia3.get_peft_model(M.gpt2(), config, low_cpu_mem_usage=True)
    lazy_theirs = peft.get_peft_model(M.gpt2(), peft.IA3Config(task_type="CAUSAL_LM"), low_cpu_mem_usage=True)
    devices = {n: p.device.type for n, p in lazy.named_parameters() if ".ia3_l." in n}
    assert devices == {n: p.device.type for n, p in lazy_theirs.named_parameters() if ".ia3_l." in n}
    assert set(devices.values()) == {"meta"}


# -- loading -------------------------------------------------------------------------------------------------------
def test_from_pretrained_kwargs_and_load_adapter_result_equal_peft(tmp_path):
    ours, theirs = _pair("bert")
    ours.save_pretrained(tmp_path / "a")
    kwargs = dict(torch_device="cpu", low_cpu_mem_usage=True)
    loaded = ia3.PeftModel.from_pretrained(M.bert_cls(), tmp_path / "a", device_map="auto", **kwargs)
    loaded_theirs = peft.PeftModel.from_pretrained(M.bert_cls(), str(tmp_path / "a"), **kwargs)
    assert not loaded.training and not loaded_theirs.training
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    torch.testing.assert_close(_logits(loaded), _logits(ours), atol=0, rtol=0)
    torch.testing.assert_close(_logits(loaded_theirs), _logits(ours), atol=1e-6, rtol=0)
    for low in (False, True):
        result = loaded.load_adapter(tmp_path / "a", f"again{low}", low_cpu_mem_usage=low, torch_device="cpu")
        expected = loaded_theirs.load_adapter(str(tmp_path / "a"), f"again{low}", low_cpu_mem_usage=low)
        assert tuple(result) == tuple(expected) == ([], [])
        assert result.missing_keys == expected.missing_keys and result.unexpected_keys == expected.unexpected_keys
        loaded.set_adapter(f"again{low}")
        torch.testing.assert_close(_logits(loaded), _logits(ours), atol=0, rtol=0)


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_on_fp16_equals_peft(tmp_path, autocast):
    def dtypes(model):
        return {n: p.dtype for n, p in model.named_parameters() if ".ia3_l." in n}

    config = dict(task_type="CAUSAL_LM", target_modules=["c_attn"])
    ours = ia3.get_peft_model(M.gpt2().half(), ia3.IA3Config(**config), autocast_adapter_dtype=False)
    theirs = peft.get_peft_model(M.gpt2().half(), peft.IA3Config(**config), autocast_adapter_dtype=False)
    assert dtypes(ours) == dtypes(theirs) and set(dtypes(ours).values()) == {torch.float16}
    # a second adapter: PEFT's add_adapter has its own autocast_adapter_dtype (default True)
    ours.add_adapter("plain", ia3.IA3Config(**config))
    theirs.add_adapter("plain", peft.IA3Config(**config))
    ours.add_adapter("second", ia3.IA3Config(**config), autocast_adapter_dtype=autocast)
    theirs.add_adapter("second", peft.IA3Config(**config), autocast_adapter_dtype=autocast)
    assert dtypes(ours) == dtypes(theirs)
    assert ours.base_model.model.transformer.h[0].attn.c_attn.ia3_l["plain"].dtype == torch.float32
    ours.save_pretrained(tmp_path, selected_adapters=["plain"])
    ours.load_adapter(tmp_path / "plain", "loaded", autocast_adapter_dtype=autocast)
    theirs.load_adapter(str(tmp_path / "plain"), "loaded", autocast_adapter_dtype=autocast)
    assert dtypes(ours) == dtypes(theirs)


# -- methods and attributes ------------------------------------------------------------------------------------------
def test_attributes_equal_peft():
    ours, theirs = _pair("bert")
    assert ours.targeted_module_names == theirs.targeted_module_names
    assert ours.modules_to_save == theirs.modules_to_save == {"classifier", "score"}
    assert ours.active_peft_config is ours.peft_config["default"]
    assert ours.active_peft_config.target_modules == sorted(theirs.active_peft_config.target_modules)
    plain = ia3.get_peft_model(M.t5(), ia3.IA3Config(task_type="SEQ_2_SEQ_LM"))
    assert plain.modules_to_save is None
    assert peft.get_peft_model(M.t5(), peft.IA3Config(task_type="SEQ_2_SEQ_LM")).modules_to_save is None


def _grads(model):
    return {n: p.requires_grad for n, p in model.named_parameters() if ".ia3_l." in n or ".modules_to_save." in n}


def test_disable_enable_adapter_layers_and_requires_grad_equal_peft():
    ours, theirs = _pair("bert")
    before = _grads(ours)
    assert before == _grads(theirs) and any(before.values())
    with ours.disable_adapter(), theirs.disable_adapter():
        assert _grads(ours) == _grads(theirs)
        assert not any(_grads(ours).values())  # nothing trains inside, as in PEFT
    assert _grads(ours) == _grads(theirs) == before
    with torch.no_grad():
        base = _logits(ours)
        ours.disable_adapter_layers()
        theirs.disable_adapter_layers()
        assert _grads(ours) == _grads(theirs)
        with ours.disable_adapter():
            disabled = _logits(ours)
        torch.testing.assert_close(_logits(ours), disabled, atol=0, rtol=0)
        torch.testing.assert_close(_logits(theirs), disabled, atol=1e-6, rtol=0)
        ours.enable_adapter_layers()
        theirs.enable_adapter_layers()
        torch.testing.assert_close(_logits(ours), base, atol=0, rtol=0)
    assert _grads(ours) == _grads(theirs) == before
    # merged: disabling unmerges exactly, enabling merges back
    ours.merge_adapter()
    ours.disable_adapter_layers()
    assert not ours.merged
    torch.testing.assert_close(_logits(ours), disabled, atol=0, rtol=0)
    ours.enable_adapter_layers()
    assert ours.merged


def test_set_requires_grad_equals_peft():
    ours, theirs = _pair("bert")
    for model in (ours, theirs):
        model.add_adapter("other", type(model.peft_config["default"])(task_type="SEQ_CLS"))
    assert _grads(ours) == _grads(theirs)
    for names, flag in [("other", True), (["default"], False), (["default", "other"], True)]:
        ours.set_requires_grad(names, requires_grad=flag)
        theirs.set_requires_grad(names, requires_grad=flag)
        assert _grads(ours) == _grads(theirs)


class CheckpointedLM(nn.Module):
    """A custom model whose block runs under torch's reentrant activation checkpointing: the vectors inside get
    gradients only when the block's input requires grad, which a frozen embedding's output does not."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8)
        self.block = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, ids):
        from torch.utils.checkpoint import checkpoint

        return self.head(checkpoint(self.block, self.embed(ids), use_reentrant=True)).sum()


def test_prepare_model_for_gradient_checkpointing_gives_vectors_grads():
    def vector_grads(model) -> list[bool]:
        model(torch.tensor([[1, 2, 3]])).backward()
        return [p.grad is not None for n, p in model.named_parameters() if ".ia3_l." in n]

    config = dict(target_modules=["block"], feedforward_modules=[])
    ours = ia3.get_peft_model(CheckpointedLM(), ia3.IA3Config(**config))
    theirs = peft.get_peft_model(CheckpointedLM(), peft.IA3Config(**config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on reentrant checkpointing
        assert vector_grads(ours) == vector_grads(theirs) == [True]
    assert ours.prepare_model_for_gradient_checkpointing(CheckpointedLM()) is not None


def test_layer_and_model_status_equal_peft():
    ours, theirs = _pair("bert")
    for model in (ours, theirs):
        model.add_adapter("other", type(model.peft_config["default"])(task_type="SEQ_CLS", target_modules=["query"]))
    ours.merge_adapter(["other"])
    theirs.merge_adapter(["other"])
    fields = ["name", "enabled", "active_adapters", "merged_adapters", "requires_grad", "available_adapters", "devices"]
    mine = [{f: getattr(s, f) for f in fields} for s in ours.get_layer_status()]
    assert mine == [{f: getattr(s, f) for f in fields} for s in theirs.get_layer_status()]
    assert ia3.get_layer_status(ours) == ours.get_layer_status()
    status, expected = ours.get_model_status(), theirs.get_model_status()
    for field in vars(expected):
        assert getattr(status, field) == getattr(expected, field), field
    assert status.merged_adapters == "irregular"  # "other" is merged where it exists, and is absent elsewhere...
    with pytest.raises(ValueError, match="no \\(IA\\)\\^3 layers"):
        ia3.get_layer_status(M.bert_cls())


# -- behaviour -------------------------------------------------------------------------------------------------------
def test_active_adapters_sharing_a_modules_to_save_module_are_refused_like_peft():
    ours, theirs = _pair("bert")
    for model in (ours, theirs):
        model.add_adapter("other", type(model.peft_config["default"])(task_type="SEQ_CLS"))
    with pytest.raises(ValueError):
        theirs.base_model.set_adapter(["default", "other"])  # the oracle refuses too
    with pytest.raises(ValueError, match=r"\['default', 'other'\].*classifier"):
        ours.set_adapter(["default", "other"])
    assert ours.active_adapters == ["default"]  # nothing changed


def test_second_merge_warns_like_peft():
    ours, theirs = _pair("t5")
    ours.merge_adapter()
    theirs.merge_adapter()
    with pytest.warns(UserWarning, match="already merged"):
        theirs.merge_adapter()
    with pytest.warns(UserWarning, match="already merged"):
        ours.merge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.unmerge_adapter()
        ours.merge_adapter()  # merged again after an unmerge: no warning


# -- files -----------------------------------------------------------------------------------------------------------
CARD_FIELDS = ("library_name", "base_model", "tags", "pipeline_tag")


def test_model_card_fields_equal_peft(tmp_path):
    folder = make_model_dir(tmp_path, "causal")
    ours = ia3.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(folder), ia3.IA3Config(task_type="CAUSAL_LM"))
    theirs = peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(folder), peft.IA3Config(task_type="CAUSAL_LM"))
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    card = ModelCard.load(tmp_path / "ours" / "README.md")
    card_theirs = ModelCard.load(tmp_path / "theirs" / "README.md")
    for field in CARD_FIELDS:
        assert card.data.get(field) == card_theirs.data.get(field), field
    assert card.data.library_name == "peft" and card.data.base_model == str(folder)
    assert f"base_model:adapter:{folder}" in card.data.tags
    # an existing card keeps its text and its own metadata, as in PEFT
    for side in ("ours", "theirs"):
        (tmp_path / side / "README.md").write_text("---\nlicense: mit\n---\n\nMy notes.\n")
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    card = ModelCard.load(tmp_path / "ours" / "README.md")
    card_theirs = ModelCard.load(tmp_path / "theirs" / "README.md")
    assert "My notes." in card.text and card.data.license == card_theirs.data.license == "mit"
    for field in CARD_FIELDS:
        assert card.data.get(field) == card_theirs.data.get(field), field


def test_auto_mapping_for_models_without_task_type_equals_peft(tmp_path):
    config = dict(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])
    ia3.get_peft_model(MLP(), ia3.IA3Config(**config)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(MLP(), peft.IA3Config(**config)).save_pretrained(tmp_path / "theirs")
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    expected = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert mine["auto_mapping"] == expected["auto_mapping"] == {"base_model_class": "MLP", "parent_library": __name__}
    ia3.IA3Config.from_pretrained(tmp_path / "ours")  # and it reads back
    # a task type: no auto_mapping, in both
    ia3.get_peft_model(M.t5(), ia3.IA3Config(task_type="SEQ_2_SEQ_LM")).save_pretrained(tmp_path / "t5")
    assert json.loads((tmp_path / "t5" / "adapter_config.json").read_text())["auto_mapping"] is None


# -- the recipe's classification run through AutoPeftModelForSequenceClassification ----------------------------------
def test_auto_peft_model_for_sequence_classification_loads_a_cls_run(tmp_path):
    from ia3.recipe.config import build_config
    from ia3.recipe.inference import load_run, run_config
    from ia3.recipe.train import train

    lines = DEMO.read_text(encoding="utf-8").splitlines(keepends=True)
    data = tmp_path / "small.csv"
    data.write_text("".join(lines[:61]), encoding="utf-8")
    model_dir = make_model_dir(tmp_path, "cls")
    out = tmp_path / "run"
    overrides = {
        "output_dir": str(out),
        "model.name": str(model_dir),
        "model.task": "cls",
        "data.dataset": str(data),
        "data.subset": "none",
        "data.text_column": "text",
        "train.epochs": "1",
        "train.batch_size": "16",
        "train.plots": "false",
        "train.show_examples": "0",
    }
    train(build_config(overrides=overrides), progress=False)
    labels = yaml.safe_load((out / "recipe.yaml").read_text())["data"]["label_names"]
    assert labels == ["negative", "neutral", "positive"]

    model = ia3.AutoPeftModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "PeftModelForSequenceClassification"
    assert model.config.num_labels == 3
    assert model.config.id2label == dict(enumerate(labels))
    assert model.config.label2id == {name: i for i, name in enumerate(labels)}
    _, recipe_model = load_run(out, run_config(out), labels, device="cpu")
    ids = {"input_ids": torch.tensor([[5, 6, 7, 1]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, recipe_model(**ids).logits, atol=0, rtol=0)


def test_auto_cls_labels_from_the_head_of_a_peft_adapter(tmp_path):
    """An adapter saved by PEFT carries no label names; the head's shape still gives the number of labels."""
    folder = make_model_dir(tmp_path, "cls")
    base = tf.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=5)
    peft.get_peft_model(base, peft.IA3Config(task_type="SEQ_CLS")).save_pretrained(tmp_path / "adapter")
    model = ia3.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    assert model.config.num_labels == 5
    # and ia3's own metadata does not get in PEFT's way
    ours = ia3.get_peft_model(
        tf.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=5), ia3.IA3Config(task_type="SEQ_CLS")
    )
    ours.save_pretrained(tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    )
    theirs = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "ours"), num_labels=5)
    assert theirs.config.num_labels == 5
