"""The `README.md` model card that `save_pretrained` writes next to an adapter, with the Hub's metadata.

The metadata is PEFT's: `library_name: peft` (the files are PEFT's format, so the Hub offers PEFT's loading
snippet), `base_model`, `tags` (`base_model:adapter:<base>`, `transformers`) and `pipeline_tag` for causal LMs. An
existing card keeps its text: only those fields are set and a framework line is added, as PEFT does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from torch import nn

from ia3.serialization import atomic_write_text
from ia3.version import __version__

CARD_NAME = "README.md"
FRAMEWORK_HEADING = "### Framework versions"

_BODY = """
# (IA)^3 adapter{for_base}

An (IA)^3 adapter ([Liu et al. 2022](https://arxiv.org/abs/2205.05638)) in PEFT's format
(`adapter_config.json` + `adapter_model.safetensors`), saved by ia3. It loads with ia3 or with PEFT:

```python
from peft import AutoPeftModel  # or: from ia3 import AutoPeftModel

model = AutoPeftModel.from_pretrained("<this folder or repo>")
```

{heading}

{framework}
"""


def _base_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return str(name) if name else None


def is_transformers_model(model: nn.Module) -> bool:
    """True for a transformers `PreTrainedModel` (without importing transformers' modeling code, which takes
    seconds, for a model that cannot be one)."""
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


def card_metadata(base: nn.Module, is_causal_lm: bool) -> dict[str, object]:
    """The metadata fields ia3 sets, for base model `base` (the wrapped model)."""
    tags = set(getattr(base, "model_tags", None) or [])
    if is_transformers_model(base):
        tags.add("transformers")
    name_or_path = getattr(base, "name_or_path", None)
    if name_or_path is not None:
        tags.add(f"base_model:adapter:{name_or_path}")
    data: dict[str, object] = {"library_name": "peft"}
    if tags:
        data["tags"] = sorted(tags)
    base_name = _base_name(base)
    if base_name:
        data["base_model"] = base_name
    if is_causal_lm:
        data["pipeline_tag"] = "text-generation"
    return data


def write_model_card(save_directory: str | os.PathLike, base: nn.Module, is_causal_lm: bool) -> None:
    """Create `README.md` in `save_directory`, or update the metadata of the one there (keeping its text)."""
    # lazy: huggingface_hub's card module pulls in jinja2 and yaml, needed only when an adapter is saved
    from huggingface_hub import ModelCard, ModelCardData

    path = Path(save_directory) / CARD_NAME
    framework = f"- ia3 {__version__}"
    metadata = card_metadata(base, is_causal_lm)
    if path.is_file():
        card = ModelCard(path.read_text(encoding="utf-8"))
        if metadata.get("pipeline_tag") and card.data.pipeline_tag:
            metadata.pop("pipeline_tag")  # the author's choice stays
        if "tags" in metadata:
            metadata["tags"] = sorted(set(card.data.tags or []) | set(metadata["tags"]))  # type: ignore[call-overload]
        for key, value in metadata.items():
            card.data[key] = value
        lines = card.text.splitlines()
        if framework not in lines:
            if FRAMEWORK_HEADING in lines:
                lines.insert(lines.index(FRAMEWORK_HEADING) + 2, framework)
            else:
                lines += ["", FRAMEWORK_HEADING, "", framework]
            card.text = "\n".join(lines) + "\n"
    else:
        base_name = metadata.get("base_model")
        body = _BODY.format(
            for_base=f" for {base_name}" if base_name else "", heading=FRAMEWORK_HEADING, framework=framework
        )
        card = ModelCard(f"---\n{ModelCardData(**metadata).to_yaml()}\n---\n{body}")
    atomic_write_text(path, str(card))
