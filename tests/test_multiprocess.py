"""Training on several processes (`accelerate launch`, CPU + gloo) gives the adapter of one process, written once.

Each process trains on `global_batch[rank::world]` and the loss is a sum over the step's units, so two processes
follow the single-process trajectory up to float rounding (per-slice padding and a different summation order).
The tiny models here have dropout switched off: with dropout, each process draws its own masks for its own rows, a
legitimate difference that no split can avoid.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_dirs import DEMO, make_model_dir

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
ACCELERATE = shutil.which("accelerate", path=str(VENV_BIN)) or shutil.which("accelerate")
EPOCHS = 2
CHECKPOINT_EVERY = 2


def _env(tmp: Path) -> dict[str, str]:
    return {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(tmp), "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "PYTHONHASHSEED": "0"}


def no_dropout_model(root: Path, kind: str) -> Path:
    path = make_model_dir(root, kind)
    config = json.loads((path / "config.json").read_text())
    for key in ("dropout_rate", "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
        if key in config:
            config[key] = 0.0
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    lines = DEMO.read_text(encoding="utf-8").splitlines(keepends=True)
    data = root / "data100.csv"
    data.write_text("".join(lines[:101]), encoding="utf-8")  # header + 100 rows, all three classes
    return root, data, {kind: no_dropout_model(root / "models", kind) for kind in ("cls", "seq2seq")}


def _config(root: Path, model: Path, task: str, data: Path) -> Path:
    path = root / f"{task}.yaml"
    path.write_text(
        f"model:\n  name: {model}\n  task: {task}\n"
        f"data:\n  dataset: {data}\n  subset: null\n  text_column: text\n  val_split: 0.1\n"
        f"train:\n  epochs: {EPOCHS}\n  batch_size: 16\n  eval_batch_size: 64\n  lr: 0.05\n  precision: fp32\n"
        f"  checkpoint_every: {CHECKPOINT_EVERY}\n  plots: false\n  generation_eval: false\n"
    )
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], tmp: Path) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp), timeout=400, cwd=tmp)
    assert done.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-6000:]}"


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _expected_files(steps_per_epoch: int) -> set[str]:
    steps = {s for s in range(1, EPOCHS * steps_per_epoch + 1)
             if s % steps_per_epoch == 0 or s % CHECKPOINT_EVERY == 0}  # epoch ends and every N steps
    kept = sorted(steps)[-2:]  # checkpoint.KEEP
    files = {"adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "metrics.jsonl", "metrics.json",
             "checkpoints/latest"}
    for s in kept:
        files |= {f"checkpoints/step-{s:08d}/{name}" for name in
                  ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "trainer_state.json",
                   "trainer_state.safetensors")}
    return files


@pytest.mark.skipif(ACCELERATE is None, reason="needs the accelerate CLI")
@pytest.mark.parametrize("task", ["cls", "seq2seq"])
def test_two_processes_match_one(setup, tmp_path, task):
    root, data, models = setup
    config = _config(tmp_path, models[task], task, data)
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "ia3", "-q", "train", "--config", str(config), "--output-dir", str(one)], tmp_path)
    _run([ACCELERATE, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port()),
          "-m", "ia3", "-q", "train", "--config", str(config), "--output-dir", str(two)], tmp_path)

    # the same adapter, within fp32 rounding
    a, b = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"\n{task}: max |adapter(1 process) - adapter(2 processes)| = {diff:.3g} over {len(a)} tensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    moved = [k for k, v in a.items() if k.endswith("ia3_l") and not torch.equal(v, torch.ones_like(v))]
    assert moved, "the vectors did not train"

    # every file written once, by the main process: the same set as one process, no temporary files
    train_rows = 90  # 100 rows, val_split 0.1
    steps_per_epoch = -(-train_rows // 16)
    assert _files(one) == _expected_files(steps_per_epoch)
    assert _files(two) == _files(one)
    last = f"step-{EPOCHS * steps_per_epoch:08d}"
    assert (two / "checkpoints" / "latest").read_text() == last + "\n"
    history = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(EPOCHS))  # one line per epoch, not one per process
    reference = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    for mine, theirs in zip(history, reference):
        assert mine["step"] == theirs["step"]
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)  # reduced over both processes
        assert mine["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-4)
    state = json.loads((two / "checkpoints" / last / "trainer_state.json").read_text())
    assert state["step"] == EPOCHS * steps_per_epoch and len(state["history"]) == EPOCHS
    ckpt_a = load_file(one / "checkpoints" / last / "trainer_state.safetensors")
    ckpt_b = load_file(two / "checkpoints" / last / "trainer_state.safetensors")
    assert ckpt_a.keys() == ckpt_b.keys()
    for key in ckpt_a:
        if key.startswith("state."):  # AdamW moments
            torch.testing.assert_close(ckpt_b[key], ckpt_a[key], atol=1e-5, rtol=1e-3)
    assert json.loads((two / "metrics.json").read_text())["epoch"] == EPOCHS - 1
    assert os.path.getsize(two / "recipe.yaml") == os.path.getsize(one / "recipe.yaml")
