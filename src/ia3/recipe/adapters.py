"""Adapter files as artefacts: inspect, merge into a full model, push to the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ia3.config import IA3Config
from ia3.serialization import WEIGHTS_NAME, load_tensors

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo


def inspect_adapter(adapter_dir: str | Path) -> dict:
    """What an adapter folder holds: base model, task, targets, vector counts, file size (reads no base model)."""
    folder = Path(adapter_dir)
    config = IA3Config.from_pretrained(folder)
    weights = folder / WEIGHTS_NAME
    tensors = load_tensors(weights)
    vectors = {k: v for k, v in tensors.items() if k.endswith(".ia3_l")}
    others = {k: v for k, v in tensors.items() if not k.endswith(".ia3_l")}
    input_side = sum(1 for v in vectors.values() if v.dim() == 2 and v.shape[0] == 1 and v.shape[1] > 1)
    return {
        "path": str(folder),
        "base_model": config.base_model_name_or_path,
        "task_type": config.task_type,
        "target_modules": config.target_modules,
        "feedforward_modules": config.feedforward_modules,
        "modules_to_save": config.modules_to_save,
        "layers": len(vectors),
        "input_side_layers": input_side,
        "ia3_parameters": sum(v.numel() for v in vectors.values()),
        "modules_to_save_parameters": sum(v.numel() for v in others.values()),
        "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in tensors.values()}),
        "file_bytes": weights.stat().st_size,
        "other_adapters": sorted(p.name for p in folder.iterdir() if (p / WEIGHTS_NAME).is_file()),
    }


def merge_to_full_model(adapter_dir: str | Path, output_dir: str | Path, safe_merge: bool = True) -> Path:
    """Merge a trained run's adapter into its base model and save the full model (and tokenizer) to `output_dir`."""
    from ia3.recipe.inference import load_run, run_config

    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; pick a new --output folder")
    # merged into the full-precision base, also for a run trained on a quantised one (whose codes cannot take it)
    cfg = run_config(adapter_dir, {"model.quantization": "none"})
    task, model = load_run(adapter_dir, cfg, cfg.data.label_names or [], device="cpu")
    merged = model.merge_and_unload(safe_merge=safe_merge)
    tmp = out.with_name(f".{out.name}.tmp")
    merged.save_pretrained(tmp)
    task.tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def push_adapter(
    adapter_dir: str | Path, repo_id: str, private: bool | None = None, token: str | None = None
) -> CommitInfo:
    """Upload an adapter folder's `adapter_config.json`, `adapter_model.safetensors` and model card (`README.md`, when
    there is one) to the Hub repo `repo_id`; a run folder's other files (metrics, checkpoints, plots) stay here."""
    from huggingface_hub import HfApi

    folder = Path(adapter_dir)
    IA3Config.from_pretrained(folder)  # refuse to upload something that is not an adapter
    load_tensors(folder / WEIGHTS_NAME)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        allow_patterns=["adapter_config.json", WEIGHTS_NAME, "README.md"],
        commit_message="Upload (IA)^3 adapter",
    )
