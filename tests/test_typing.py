"""The public API type-checks as documented: mypy accepts tests/typing/public_api.py and rejects the misuses in
tests/typing/public_api_errors.py, line by line (so the check can fail)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

TYPING = Path(__file__).parent / "typing"
ROOT = Path(__file__).parent.parent
# Strict for the checked file; third-party packages (torch, transformers) are read for their types but their own
# errors are not reported. ia3 itself is type-checked as the checked file uses it.
FLAGS = ["--strict", "--follow-imports=silent", "--ignore-missing-imports", "--no-color-output", "--no-error-summary"]


def _mypy(path: Path, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mypy", *FLAGS, f"--cache-dir={cache_dir}", str(path)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cache_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mypy's cache: kept in .pytest_cache between runs (reading torch's types costs ~40 s the first time)."""
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("mypy")) if cache is not None else tmp_path_factory.mktemp("mypy")


@pytest.mark.slow
def test_public_api_type_checks(cache_dir):
    result = _mypy(TYPING / "public_api.py", cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_misuses_are_type_errors(cache_dir):
    path = TYPING / "public_api_errors.py"
    marked = {i for i, line in enumerate(path.read_text().splitlines(), 1) if "  # error: " in line}
    result = _mypy(path, cache_dir)
    assert result.returncode == 1, result.stdout + result.stderr
    reported = {int(n) for n in re.findall(r"public_api_errors\.py:(\d+): error:", result.stdout)}
    assert len(marked) == 8 and reported == marked, result.stdout
