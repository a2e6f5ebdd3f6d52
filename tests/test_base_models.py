"""Naming base models: `.gguf` files, folders with `gguf_file`, `module:<package>`; and the errors for bad ones."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from ia3.base_models import BaseModelError, check_gguf_file, portable_reference, resolve_base_model


def _write_gguf(path: Path, arch: str = "llama") -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """A folder on sys.path where tests create packages."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in [m for m in sys.modules if m.startswith("ia3_fake_")]:
        del sys.modules[name]


def _package(root: Path, name: str, files: dict[str, bytes | None]) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "__init__.py").write_text("import a_dependency_that_is_missing\n")  # never imported
    for rel, data in files.items():
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            _write_gguf(target)
        else:
            target.write_bytes(data)
    return folder


def test_gguf_path_folder_and_module(packages, tmp_path):
    folder = _package(packages, "ia3_fake_one", {"weights/model.Q4.gguf": None})
    ref = resolve_base_model("module:ia3_fake_one")
    assert (ref.path, ref.gguf_file) == (str(folder / "weights"), "model.Q4.gguf")
    assert ref.from_pretrained_kwargs() == {"gguf_file": "model.Q4.gguf"}
    assert portable_reference(ref) == "module:ia3_fake_one"  # not this machine's path

    file_ref = resolve_base_model(str(folder / "weights" / "model.Q4.gguf"))
    assert (file_ref.path, file_ref.gguf_file) == (str(folder / "weights"), "model.Q4.gguf")
    assert portable_reference(file_ref) == str(folder / "weights" / "model.Q4.gguf")

    folder_ref = resolve_base_model(str(folder / "weights"), gguf_file="model.Q4.gguf")
    assert folder_ref.gguf_file == "model.Q4.gguf"
    assert resolve_base_model("org/model").from_pretrained_kwargs() == {}


def test_module_with_a_transformers_folder_wins(packages):
    folder = _package(packages, "ia3_fake_hf", {"model/config.json": b"{}", "extra.gguf": None})
    ref = resolve_base_model("module:ia3_fake_hf")
    assert (ref.path, ref.gguf_file) == (str(folder / "model"), None)


def test_module_errors_name_the_package_and_what_to_do(packages):
    with pytest.raises(BaseModelError, match=r"'ia3_fake_absent' is not installed.*pip install ia3-fake-absent"):
        resolve_base_model("module:ia3_fake_absent")
    _package(packages, "ia3_fake_empty", {"README": b"nothing"})
    with pytest.raises(BaseModelError, match=r"module:ia3_fake_empty.*holds no model"):
        resolve_base_model("module:ia3_fake_empty")
    _package(packages, "ia3_fake_two", {"a.gguf": None, "b/c.gguf": None})
    with pytest.raises(
        BaseModelError, match=r"holds 2 \.gguf files \(a\.gguf, b/c\.gguf\); pick one with --model\.gguf_file"
    ):
        resolve_base_model("module:ia3_fake_two")
    assert resolve_base_model("module:ia3_fake_two", gguf_file="a.gguf").gguf_file == "a.gguf"
    with pytest.raises(BaseModelError, match="not a Python package name"):
        resolve_base_model("module:not-a-name")


def test_bad_gguf_files_are_named(tmp_path):
    good = _write_gguf(tmp_path / "good.gguf")
    check_gguf_file(good)
    (tmp_path / "text.gguf").write_text("hello, not a model")
    with pytest.raises(BaseModelError, match=r"text\.gguf is not a GGUF file"):
        resolve_base_model(str(tmp_path / "text.gguf"))
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(BaseModelError, match=r"cut\.gguf is a damaged or truncated GGUF file"):
        resolve_base_model(str(tmp_path / "cut.gguf"))
    with pytest.raises(BaseModelError, match="does not exist"):
        resolve_base_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(BaseModelError, match=r"gguf_file 'other\.gguf' is not in"):
        resolve_base_model(str(tmp_path), gguf_file="other.gguf")


def test_unsupported_gguf_architecture_is_a_clear_error(tmp_path):
    import transformers

    from ia3.base_models import load_pretrained

    path = _write_gguf(tmp_path / "odd.gguf", arch="no-such-arch")
    ref = resolve_base_model(str(path))
    with pytest.raises(BaseModelError, match=r"transformers cannot load this GGUF model"):
        load_pretrained(transformers.AutoModelForCausalLM, ref)


def test_recipe_refuses_a_bad_gguf_before_writing_anything(tmp_path):
    from ia3.recipe.config import build_config
    from ia3.recipe.train import train

    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 10)
    out = tmp_path / "run"
    cfg = build_config(
        overrides={
            "model.name": str(tmp_path / "bad.gguf"),
            "model.task": "causal",
            "data.dataset": "demo",
            "data.subset": "none",
            "data.text_column": "text",
            "output_dir": str(out),
        }
    )
    with pytest.raises(BaseModelError, match="damaged or truncated"):
        train(cfg, progress=False)
    assert not out.exists()
