"""Bad input: wrong adapters, broken files, unknown names. Every failure names the problem and changes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import models as M
import pytest
import torch
import transformers as tf
from conftest import ia3_layers, randomize
from torch import nn

import ia3


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before), sorted(set(after) ^ set(before))[:5]
    assert all(torch.equal(after[k], before[k]) for k in before)


def _t5_adapter(folder: Path, **kwargs) -> ia3.PeftModel:
    model = ia3.get_peft_model(M.t5(), ia3.IA3Config(task_type="SEQ_2_SEQ_LM", **kwargs))
    randomize(model)
    model.save_pretrained(folder)
    return model


def _t5_wide(seed: int = 0):
    """A T5 of another size: d_model 48 and 48-wide attention (the tiny t5 has d_model 32, 32-wide attention)."""
    torch.manual_seed(seed)
    cfg = tf.T5Config(
        vocab_size=99,
        d_model=48,
        d_kv=12,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return tf.T5ForConditionalGeneration(cfg).eval()


# -- adapters from another architecture ----------------------------------------------------------------------------
def test_t5_adapter_onto_bart_raises_and_leaves_model(tmp_path):
    _t5_adapter(tmp_path)
    bart = M.bart()
    before = _snapshot(bart)
    with pytest.raises(ValueError, match=r"matches no layer.*k_proj"):
        ia3.PeftModel.from_pretrained(bart, tmp_path)
    _assert_unchanged(bart, before)
    assert not ia3_layers(bart)

    # load_adapter into a bart PeftModel: same error, adapters and outputs as before
    peft_bart = ia3.get_peft_model(M.bart(), ia3.IA3Config(task_type="SEQ_2_SEQ_LM"))
    randomize(peft_bart)
    before = _snapshot(peft_bart)
    with pytest.raises(ValueError, match="matches no layer"):
        peft_bart.load_adapter(tmp_path, adapter_name="t5")
    assert list(peft_bart.peft_config) == ["default"]
    _assert_unchanged(peft_bart, before)


def test_t5_adapter_onto_bigger_t5_names_the_key(tmp_path):
    _t5_adapter(tmp_path)
    wide = _t5_wide()
    before = _snapshot(wide)
    with pytest.raises(
        ValueError, match=r"SelfAttention\.k\.ia3_l has shape \(32, 1\) but this model needs \(48, 1\)"
    ) as err:
        ia3.PeftModel.from_pretrained(wide, tmp_path)
    assert "adapter_model.safetensors" in str(err.value)
    # no half-loaded adapter: the model is exactly as before, with no (IA)^3 layer left in it
    _assert_unchanged(wide, before)
    assert not ia3_layers(wide)

    # load_adapter: the same targets are already wrapped
    model = ia3.get_peft_model(_t5_wide(), ia3.IA3Config(task_type="SEQ_2_SEQ_LM"))
    randomize(model)
    before = _snapshot(model)
    batch = M.batch("t5")
    logits = model(**batch).logits
    with pytest.raises(ValueError, match=r"wo\.ia3_l has shape \(1, 48\) but this model needs \(1, 64\)"):
        model.load_adapter(tmp_path, adapter_name="small")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    _assert_unchanged(model, before)
    assert torch.equal(model(**batch).logits, logits)


def test_failed_load_adapter_unwraps_layers_it_added(tmp_path):
    _t5_adapter(tmp_path)  # targets k, v, wo
    model = ia3.get_peft_model(_t5_wide(), ia3.IA3Config(task_type="SEQ_2_SEQ_LM", target_modules=["q"]))
    before = _snapshot(model)
    names_before = set(ia3_layers(model))
    with pytest.raises(ValueError, match="shape"):
        model.load_adapter(tmp_path, adapter_name="small")
    assert list(model.peft_config) == ["default"]
    assert set(ia3_layers(model)) == names_before
    _assert_unchanged(model, before)


def test_key_mismatch_names_keys(tmp_path):
    _t5_adapter(tmp_path / "q", target_modules=["q"])
    _t5_adapter(tmp_path / "kv", target_modules=["k", "v"])
    # config says k, v; tensors are for q
    os.replace(tmp_path / "q" / "adapter_model.safetensors", tmp_path / "kv" / "adapter_model.safetensors")
    model = M.t5()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"match no adapted module.*SelfAttention\.q\.ia3_l") as err:
        ia3.PeftModel.from_pretrained(model, tmp_path / "kv")
    assert "get no tensor" in str(err.value) and ".k.ia3_l" in str(err.value)
    _assert_unchanged(model, before)


# -- broken adapter folders ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("peft_type", ["LORA", "NOT_A_METHOD"])
def test_unknown_peft_type_in_config(tmp_path, peft_type):
    _t5_adapter(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["peft_type"] = peft_type
    path.write_text(json.dumps(data))
    model = M.t5()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=peft_type):
        ia3.PeftModel.from_pretrained(model, tmp_path)
    _assert_unchanged(model, before)
    peft_model = ia3.get_peft_model(M.t5(), ia3.IA3Config(task_type="SEQ_2_SEQ_LM"))
    with pytest.raises(ValueError, match=peft_type):
        peft_model.load_adapter(tmp_path, adapter_name="x")
    assert list(peft_model.peft_config) == ["default"]


def test_config_that_is_not_json(tmp_path):
    _t5_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json"):
        ia3.PeftModel.from_pretrained(M.t5(), tmp_path)


def _corrupt_random(path: Path) -> None:
    path.write_bytes(
        torch.randint(0, 256, (path.stat().st_size,), generator=torch.Generator().manual_seed(0))
        .to(torch.uint8)
        .numpy()
        .tobytes()
    )


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [_corrupt_random, _truncate], ids=["random-bytes", "truncated"])
def test_damaged_safetensors(tmp_path, damage):
    _t5_adapter(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    damage(weights)
    model = M.t5()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="adapter_model.safetensors") as err:
        ia3.PeftModel.from_pretrained(model, tmp_path)
    assert str(weights) in str(err.value) and "safetensors" in str(err.value)
    _assert_unchanged(model, before)
    assert not ia3_layers(model)

    peft_model = ia3.get_peft_model(M.t5(), ia3.IA3Config(task_type="SEQ_2_SEQ_LM", target_modules=["q"]))
    before = _snapshot(peft_model)
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        peft_model.load_adapter(tmp_path, adapter_name="x")
    assert list(peft_model.peft_config) == ["default"]
    _assert_unchanged(peft_model, before)


def test_missing_weights_file(tmp_path):
    _t5_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    model = M.t5()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        ia3.PeftModel.from_pretrained(model, tmp_path)
    assert not ia3_layers(model)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        ia3.PeftModel.from_pretrained(M.t5(), tmp_path / "nowhere")
    (tmp_path / "plain.txt").write_text("x")
    with pytest.raises(NotADirectoryError):
        ia3.PeftModel.from_pretrained(M.t5(), tmp_path / "plain.txt")


# -- configs that match nothing ------------------------------------------------------------------------------------
def test_target_modules_matching_nothing_lists_layers():
    model = M.t5()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"matches no layer") as err:
        ia3.get_peft_model(model, ia3.IA3Config(target_modules=["query_key_value"]))
    for layer in ("'k'", "'o'", "'q'", "'v'", "'wi'", "'wo'"):
        assert layer in str(err.value)
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match="matches no layer"):
        ia3.get_peft_model(M.t5(), ia3.IA3Config(target_modules=r"nothing\.here"))
    with pytest.raises(ValueError, match="matches no layer"):
        ia3.get_peft_model(M.t5(), ia3.IA3Config(target_modules=["k"], exclude_modules=["k"]))


def test_target_of_unsupported_type():
    with pytest.raises(ValueError, match=r"cannot wrap.*layer_norm"):
        ia3.get_peft_model(M.t5(), ia3.IA3Config(target_modules=["k", "layer_norm"]))


def test_unknown_model_type_lists_linear_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc_in = nn.Linear(3, 4)
            self.act = nn.ReLU()
            self.fc_out = nn.Linear(4, 2)

    net = Net()
    with pytest.raises(ValueError, match=r"no default target modules.*\['fc_in', 'fc_out'\]"):
        ia3.get_peft_model(net, ia3.IA3Config())
    assert isinstance(net.fc_in, nn.Linear)
    # naming a layer works
    model = ia3.get_peft_model(net, ia3.IA3Config(target_modules=["fc_out"]))
    assert set(ia3_layers(model)) == {"base_model.model.fc_out"}


def test_modules_to_save_matching_nothing():
    with pytest.raises(ValueError, match="not_a_head"):
        ia3.get_peft_model(M.bert_cls(), ia3.IA3Config(task_type="SEQ_CLS", modules_to_save=["not_a_head"]))


# -- unknown adapter names -----------------------------------------------------------------------------------------
def test_unknown_adapter_names():
    model = ia3.get_peft_model(M.gpt2(), ia3.IA3Config(task_type="CAUSAL_LM"))
    batch = M.batch("gpt2")
    with pytest.raises(ValueError, match="'missing'"):
        model.set_adapter("missing")
    with pytest.raises(ValueError, match="'missing'"):
        model.set_adapter(["default", "missing"])
    with pytest.raises(ValueError, match="'missing'"):
        model.delete_adapter("missing")
    with pytest.raises(ValueError, match="'missing'"):
        model(**batch, adapter_names=["default", "missing", "__base__"])
    with pytest.raises(ValueError, match="'missing'"):
        model.merge_adapter(["missing"])
    with pytest.raises(ValueError, match="'missing'"):
        model.save_pretrained("/nonexistent-unused", selected_adapters=["missing"])
    with pytest.raises(ValueError, match="'missing'"):
        model.add_weighted_adapter(["default", "missing"], [0.5, 0.5], "mix")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert not model.base_model.merged


def test_bad_adapter_names_for_per_example():
    model = ia3.get_peft_model(M.gpt2(), ia3.IA3Config(task_type="CAUSAL_LM"))
    batch = M.batch("gpt2")
    with pytest.raises(ValueError, match="one adapter name per row"):
        model(**batch, adapter_names="default")
    with pytest.raises(ValueError, match="adapter_names"):
        model(**batch, adapter_names=["default", "__base__"])  # 2 names for 3 rows


def test_adding_adapters_refuses_bad_names_and_duplicates():
    model = ia3.get_peft_model(M.t5(), ia3.IA3Config(task_type="SEQ_2_SEQ_LM"))
    for bad in ("", "a.b", "__base__", "keys", "values", "update"):  # the last three: ParameterDict methods
        with pytest.raises(ValueError, match="Invalid adapter name"):
            model.add_adapter(bad, ia3.IA3Config(task_type="SEQ_2_SEQ_LM"))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", ia3.IA3Config(task_type="SEQ_2_SEQ_LM"))
    with pytest.raises(ValueError, match="already has"):
        ia3.get_peft_model(model.get_base_model(), ia3.IA3Config())
    import peft

    with pytest.raises(TypeError, match="IA3Config"):
        ia3.get_peft_model(M.t5(), peft.IA3Config())
    assert list(model.peft_config) == ["default"]


def test_conflicting_sides_refused_without_change():
    model = ia3.get_peft_model(M.t5(), ia3.IA3Config(task_type="SEQ_2_SEQ_LM"))  # wo scales its input
    before = _snapshot(model)
    with pytest.raises(ValueError, match="wo already scales its input"):
        model.add_adapter(
            "other", ia3.IA3Config(task_type="SEQ_2_SEQ_LM", target_modules=["q", "wo"], feedforward_modules=[])
        )
    assert list(model.peft_config) == ["default"]
    _assert_unchanged(model, before)


def test_layer_refuses_unsupported_module():
    with pytest.raises(TypeError, match="Embedding"):
        ia3.IA3Layer(nn.Embedding(4, 3), is_feedforward=False)


def test_deleting_merged_adapter_refused():
    model = ia3.get_peft_model(M.gpt2(), ia3.IA3Config(task_type="CAUSAL_LM"))
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        model.delete_adapter("default")
    assert list(model.peft_config) == ["default"]
    model.unmerge_adapter()
    model.delete_adapter("default")
    assert model.peft_config == {}
