"""Saving and loading adapters, in both directions with peft, plus Auto classes, the Hub upload and pickles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import models as M
import peft
import pytest
import torch
from conftest import randomize
from safetensors.torch import load_file

import ia3

NAMES = ["t5", "gpt2", "bert", "llama"]
FILES = {"adapter_config.json", "adapter_model.safetensors"}
CARD = {"README.md"}  # the model card, in the top folder only (as PEFT writes it)


def _ours(name: str, seed: int = 0, **kwargs) -> ia3.PeftModel:
    model = ia3.get_peft_model(M.ALL[name](), ia3.IA3Config(task_type=M.TASK[name], **kwargs))
    randomize(model, seed=seed)
    with torch.no_grad():  # make a classification head copy differ from the original head
        for pname, p in model.named_parameters():
            if ".modules_to_save." in pname:
                p.add_(0.2)
    return model


def _theirs(name: str, seed: int = 0, **kwargs):
    model = peft.get_peft_model(M.ALL[name](), peft.IA3Config(task_type=M.TASK[name], **kwargs))
    randomize(model, seed=seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".modules_to_save." in pname:
                p.add_(0.2)
    return model


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _logits(model, name):
    with torch.no_grad():
        return model(**M.batch(name)).logits


@pytest.mark.parametrize("name", NAMES)
def test_ia3_saved_adapter_loads_in_peft(name, tmp_path):
    ours = _ours(name)
    ours.save_pretrained(tmp_path)
    assert _files(tmp_path) == FILES | CARD
    loaded = peft.PeftModel.from_pretrained(M.ALL[name](), tmp_path)
    expected = _logits(ours, name)
    torch.testing.assert_close(_logits(loaded, name), expected, atol=1e-6, rtol=0)
    with ours.disable_adapter():
        assert (_logits(ours, name) - expected).abs().max() > 1e-3  # the adapter matters


@pytest.mark.parametrize("name", NAMES)
def test_peft_saved_adapter_loads_in_ia3(name, tmp_path):
    theirs = _theirs(name)
    theirs.save_pretrained(tmp_path)
    loaded = ia3.PeftModel.from_pretrained(M.ALL[name](), tmp_path)
    assert type(loaded).__name__ == type(theirs).__name__
    torch.testing.assert_close(_logits(loaded, name), _logits(theirs, name), atol=1e-6, rtol=0)
    if name == "bert":
        head = loaded.get_base_model().classifier
        assert torch.equal(
            head.modules_to_save["default"].weight, theirs.base_model.model.classifier.modules_to_save["default"].weight
        )
        assert not torch.equal(head.modules_to_save["default"].weight, head.original_module.weight)


@pytest.mark.parametrize("name", NAMES)
def test_safetensors_keys_equal_peft(name, tmp_path):
    _ours(name).save_pretrained(tmp_path / "ours")
    _theirs(name).save_pretrained(tmp_path / "theirs")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert set(mine) == set(peft_file)
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in peft_file.items()}
    assert {k: v.dtype for k, v in mine.items()} == {k: v.dtype for k, v in peft_file.items()}
    assert all(k.startswith("base_model.model.") for k in mine)
    assert not any(".default" in k for k in mine)  # adapter name is stripped, as PEFT does


def test_second_adapter_goes_to_subfolder_like_peft(tmp_path):
    ours = _ours("t5")
    ours.add_adapter("second", ia3.IA3Config(task_type="SEQ_2_SEQ_LM", target_modules=["q"]))
    randomize(ours, "second", seed=5)
    ours.save_pretrained(tmp_path / "ours")
    theirs = _theirs("t5")
    theirs.add_adapter("second", peft.IA3Config(task_type="SEQ_2_SEQ_LM", target_modules=["q"]))
    theirs.save_pretrained(tmp_path / "theirs")
    assert _files(tmp_path / "ours") == FILES | CARD | {f"second/{f}" for f in FILES}
    assert _files(tmp_path / "theirs") == _files(tmp_path / "ours")
    sub_ours = load_file(tmp_path / "ours" / "second" / "adapter_model.safetensors")
    sub_theirs = load_file(tmp_path / "theirs" / "second" / "adapter_model.safetensors")
    assert set(sub_ours) == set(sub_theirs) and all(k.endswith(".q.ia3_l") for k in sub_ours)
    # selected_adapters: only that adapter (not "default", so in its subfolder)
    ours.save_pretrained(tmp_path / "sel", selected_adapters=["second"])
    assert _files(tmp_path / "sel") == CARD | {f"second/{f}" for f in FILES}
    # the subfolder loads with peft (via subfolder=) and gives the same outputs
    ours.set_adapter("second")
    loaded = peft.PeftModel.from_pretrained(M.t5(), tmp_path / "ours", subfolder="second")
    torch.testing.assert_close(_logits(loaded, "t5"), _logits(ours, "t5"), atol=1e-6, rtol=0)
    loaded_ia3 = ia3.PeftModel.from_pretrained(M.t5(), tmp_path / "ours", subfolder="second")
    torch.testing.assert_close(_logits(loaded_ia3, "t5"), _logits(ours, "t5"), atol=1e-6, rtol=0)


def test_saved_config_is_inference_mode_and_model_unchanged(tmp_path):
    ours = _ours("gpt2")
    ours.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["inference_mode"] is True
    assert ours.peft_config["default"].inference_mode is False  # saving does not freeze the live model
    assert any(p.requires_grad for p in ours.parameters())


def test_is_trainable_flag(tmp_path):
    _ours("bert").save_pretrained(tmp_path)
    frozen = ia3.PeftModel.from_pretrained(M.bert_cls(), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert frozen.get_nb_trainable_parameters()[0] == 0
    trainable = ia3.PeftModel.from_pretrained(M.bert_cls(), tmp_path, is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names and all(".ia3_l.default" in n or ".modules_to_save.default." in n for n in names)
    vectors = {n for n, _ in trainable.named_parameters() if ".ia3_l." in n}
    assert vectors <= names
    assert any(".modules_to_save.default." in n for n in names)
    # peft agrees on what is trainable
    peft_trainable = peft.PeftModel.from_pretrained(M.bert_cls(), tmp_path, is_trainable=True)
    assert names == {n for n, p in peft_trainable.named_parameters() if p.requires_grad}


def test_load_adapter_adds_second_adapter(tmp_path):
    first = _ours("t5", seed=1)
    second = _ours("t5", seed=2)
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    model = ia3.PeftModel.from_pretrained(M.t5(), tmp_path / "a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    assert list(model.peft_config) == ["default", "b"]
    assert model.active_adapter == "default"  # not made active
    torch.testing.assert_close(_logits(model, "t5"), _logits(first, "t5"), atol=1e-6, rtol=0)
    model.set_adapter("b")
    torch.testing.assert_close(_logits(model, "t5"), _logits(second, "t5"), atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in model.parameters())
    model.load_adapter(tmp_path / "a", adapter_name="c", is_trainable=True)
    model.set_adapter("c")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.endswith(".ia3_l.c")
    }


def _save_base(name: str, folder: Path) -> Path:
    base = M.ALL[name]()
    base.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("name", "auto"),
    [
        ("t5", ia3.AutoPeftModelForSeq2SeqLM),
        ("gpt2", ia3.AutoPeftModelForCausalLM),
        ("bert", ia3.AutoPeftModelForSequenceClassification),
        ("llama", ia3.AutoPeftModel),
    ],
)
def test_auto_peft_model_loads_from_local_dir(name, auto, tmp_path):
    base_dir = _save_base(name, tmp_path / "base")
    ours = ia3.get_peft_model(
        M.ALL[name](), ia3.IA3Config(task_type=M.TASK[name], base_model_name_or_path=str(base_dir))
    )
    randomize(ours)
    ours.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base_dir
    )
    loaded = auto.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded, ia3.peft_model.TASK_TO_MODEL[M.TASK[name]])
    loaded.eval()
    torch.testing.assert_close(_logits(loaded, name), _logits(ours, name), atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    # peft's own Auto class for the task reads the same folder to the same outputs (peft's plain AutoPeftModel
    # refuses adapters that have a task type; ours picks the task's auto class)
    peft_auto_name = {
        "t5": "AutoPeftModelForSeq2SeqLM",
        "gpt2": "AutoPeftModelForCausalLM",
        "bert": "AutoPeftModelForSequenceClassification",
        "llama": "AutoPeftModelForCausalLM",
    }[name]
    peft_auto = getattr(peft, peft_auto_name).from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(peft_auto, name), _logits(ours, name), atol=1e-6, rtol=0)


def test_auto_causal_lm_refuses_seq2seq_adapter(tmp_path):
    base_dir = _save_base("t5", tmp_path / "base")
    ia3.get_peft_model(
        M.t5(), ia3.IA3Config(task_type="SEQ_2_SEQ_LM", base_model_name_or_path=str(base_dir))
    ).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="SEQ_2_SEQ_LM"):
        ia3.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    with pytest.raises(OSError):
        ia3.AutoPeftModelForCausalLM()


def test_auto_without_base_model_name_raises(tmp_path):
    ia3.get_peft_model(M.t5(), ia3.IA3Config(task_type="SEQ_2_SEQ_LM")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        ia3.AutoPeftModelForSeq2SeqLM.from_pretrained(tmp_path)


def test_push_to_hub_without_network(monkeypatch, tmp_path):
    import huggingface_hub

    calls: dict[str, list] = {"create_repo": [], "upload_folder": []}
    uploaded = tmp_path / "uploaded"

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append((repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        calls["upload_folder"].append((repo_id, sorted(files), kwargs))
        uploaded.mkdir()
        for rel, data in files.items():
            (uploaded / rel).write_bytes(data)
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)

    ours = _ours("t5")
    result = ours.push_to_hub("someone/t5-ia3", private=True, commit_message="add adapter")
    assert result == "commit-info"
    assert len(calls["create_repo"]) == 1
    repo_id, kwargs = calls["create_repo"][0]
    assert repo_id == "someone/t5-ia3"
    assert kwargs.get("private") is True and kwargs.get("exist_ok") is True
    assert len(calls["upload_folder"]) == 1
    repo_id, files, kwargs = calls["upload_folder"][0]
    assert repo_id == "someone/t5-ia3"
    assert files == sorted(FILES | CARD)
    assert kwargs.get("commit_message") == "add adapter"
    # the uploaded files are a working adapter, for both libraries
    for loader in (ia3.PeftModel, peft.PeftModel):
        loaded = loader.from_pretrained(M.t5(), uploaded)
        torch.testing.assert_close(_logits(loaded, "t5"), _logits(ours, "t5"), atol=1e-6, rtol=0)


def _pickled_adapter(tmp_path: Path) -> tuple[Path, ia3.PeftModel]:
    ours = _ours("gpt2")
    ours.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    return tmp_path, ours


def test_pickle_refused_unless_allowed(tmp_path):
    folder, ours = _pickled_adapter(tmp_path)
    model = M.gpt2()
    with pytest.raises(ValueError, match="pickle"):
        ia3.PeftModel.from_pretrained(model, folder)
    # nothing was left behind on the model
    assert not any(isinstance(m, ia3.IA3Layer) for m in model.modules())
    loaded = ia3.PeftModel.from_pretrained(M.gpt2(), folder, allow_pickle=True)
    torch.testing.assert_close(_logits(loaded, "gpt2"), _logits(ours, "gpt2"), atol=1e-6, rtol=0)


def test_pickle_refused_in_load_adapter(tmp_path):
    folder, ours = _pickled_adapter(tmp_path / "pickled")
    model = _ours("gpt2", seed=9)
    with pytest.raises(ValueError, match="pickle"):
        model.load_adapter(folder, adapter_name="p")
    assert list(model.peft_config) == ["default"]
    model.load_adapter(folder, adapter_name="p", allow_pickle=True)
    model.set_adapter("p")
    torch.testing.assert_close(_logits(model, "gpt2"), _logits(ours, "gpt2"), atol=1e-6, rtol=0)


def test_safetensors_preferred_over_bin(tmp_path):
    ours = _ours("gpt2")
    ours.save_pretrained(tmp_path)
    torch.save({"garbage": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    loaded = ia3.PeftModel.from_pretrained(M.gpt2(), tmp_path)  # no allow_pickle needed: safetensors is used
    torch.testing.assert_close(_logits(loaded, "gpt2"), _logits(ours, "gpt2"), atol=1e-6, rtol=0)


def test_save_refuses_pickle_format_and_file_target(tmp_path):
    ours = _ours("gpt2")
    with pytest.raises(ValueError, match="safetensors"):
        ours.save_pretrained(tmp_path, safe_serialization=False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="file"):
        ours.save_pretrained(tmp_path / "f")
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_save_load_round_trip_keeps_values_exactly(tmp_path):
    ours = _ours("llama")
    ours.save_pretrained(tmp_path)
    loaded = ia3.PeftModel.from_pretrained(M.llama(), tmp_path)
    a, b = ours.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # saving again into the same folder overwrites cleanly
    loaded.save_pretrained(tmp_path)
    assert _files(tmp_path) == FILES | CARD
    shutil.rmtree(tmp_path)
