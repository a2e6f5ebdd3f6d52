"""Finding adapter files in a local folder or on the Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_file(
    name_or_path: str | os.PathLike,
    filename: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    missing_ok: bool = False,
) -> Path | None:
    """Return a local path to `filename` in a folder, or download it from the Hub repo `name_or_path`.

    Raises:
        FileNotFoundError: the folder exists but lacks the file, or the Hub has no such repo/file
            (unless `missing_ok`, which returns None instead).
    """
    folder = Path(name_or_path)
    if subfolder:
        folder = folder / subfolder
    if folder.is_dir():
        path = folder / filename
        if path.is_file():
            return path
        if missing_ok:
            return None
        raise FileNotFoundError(f"{path} does not exist: is {folder} an adapter folder saved by save_pretrained?")
    if Path(name_or_path).exists():
        raise NotADirectoryError(f"{name_or_path} is a file; pass the folder that holds {filename}")

    # lazy: huggingface_hub's download stack (httpx, its file locks) loads slowly and local folders never need it
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(str(name_or_path), filename, subfolder=subfolder, revision=revision, token=token))
    except EntryNotFoundError:
        if missing_ok:
            return None
        raise FileNotFoundError(f"The Hub repo {name_or_path!s} has no file {filename}") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        raise FileNotFoundError(
            f"{name_or_path!s} is neither a local folder nor a reachable Hub repo with {filename}: {err}"
        ) from None
