"""Fault injection: SIGKILL during training and during saving.

(a) `python -m ia3 train` processes are killed at seeded random moments of training (between steps, inside a
    checkpoint save, during evaluation, during the final save) and resumed with `--resume`, again and again until a
    run completes. After every kill `checkpoints/latest` must name a complete checkpoint that loads; the adapter a
    resumed run ends with must be bit for bit the one an uninterrupted run gives, and metrics.jsonl has one line per
    epoch.
(b) Processes that save in a loop (`save_tensors` of a 16 MB tensor; `PeftModel.save_pretrained` of an adapter with
    an 8 MB head) are killed at random moments: the target path always holds nothing or a complete file, and the
    temporary files a kill leaves behind are hidden `.tmp` files that no loader takes for an adapter. The saving
    processes are forked from one server that imported torch once, so that each kill costs a fraction of a second.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_dirs import DEMO, make_model_dir

from ia3 import IA3Config, PeftModel, get_peft_model
from ia3.loading import ModelSource, load_base_model
from ia3.recipe.checkpoint import LATEST, find_checkpoint, load_checkpoint
from ia3.serialization import WEIGHTS_NAME, load_tensors
from ia3.tasks import TASKS

pytestmark = pytest.mark.slow

SEED = 20240611
MIN_KILLS = 10
MAX_KILLS_PER_CHAIN = 5
LABELS = ["negative", "neutral", "positive"]


def _env(tmp: Path) -> dict[str, str]:
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(tmp),
        "HF_HOME": str(tmp / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONHASHSEED": "0",
    }


# -- (a) kill training, resume ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model = make_model_dir(root / "models", "cls")  # dropout on: the checkpointed RNG must carry it across a kill
    lines = DEMO.read_text(encoding="utf-8").splitlines(keepends=True)
    data = root / "data100.csv"
    data.write_text("".join(lines[:101]), encoding="utf-8")
    config = root / "run.yaml"
    config.write_text(
        f"model:\n  name: {model}\n  task: cls\n"
        f"data:\n  dataset: {data}\n  subset: null\n  text_column: text\n  val_split: 0.1\n"
        "train:\n  epochs: 2\n  batch_size: 16\n  eval_batch_size: 64\n  lr: 0.05\n  precision: fp32\n"
        "  checkpoint_every: 1\n  plots: false\n  generation_eval: false\n"
    )
    return root, model, config


def _launch(config: Path, out: Path, resume: bool, tmp: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ia3", "-q", "train", "--config", str(config), "--output-dir", str(out)]
    if resume:
        cmd.append("--resume")
    return subprocess.Popen(cmd, env=_env(tmp), cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, path: Path, since_ns: int) -> float:
    """Block until `path` is (re)written after `since_ns` or the process ends; returns that moment (monotonic).
    recipe.yaml is rewritten just before the training loop, once the run has loaded everything."""
    while proc.poll() is None:
        try:
            if path.stat().st_mtime_ns >= since_ns:
                break
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    return time.monotonic()


def _check_latest(out: Path, probe) -> str | None:
    """`checkpoints/latest`, when present, names a complete checkpoint that restores into a fresh model."""
    root = out / "checkpoints"
    if not (root / LATEST).exists():
        assert find_checkpoint(out) is None
        return None
    name = (root / LATEST).read_text()
    assert re.fullmatch(r"step-\d{8}\n", name), repr(name)
    folder = root / name.strip()
    assert find_checkpoint(out) == folder
    peft_model, optimizer, scheduler = probe()
    meta = load_checkpoint(folder, peft_model, optimizer, scheduler)
    assert meta["step"] == int(name[5:13]) and {"epoch", "batches_done", "history"} <= set(meta)
    saved = load_tensors(folder / "adapter" / WEIGHTS_NAME)
    for key, value in peft_model.adapter_state_dict().items():
        assert torch.equal(value, saved[key])
    assert IA3Config.from_pretrained(folder / "adapter").task_type == "SEQ_CLS"
    return name.strip()


def _latest_step(out: Path) -> int:
    try:
        return int((out / "checkpoints" / LATEST).read_text()[5:13])
    except (FileNotFoundError, ValueError):
        return 0


def _kill_point(rng: random.Random, done: int, total: int) -> tuple:
    """A seeded moment to kill a run that resumes after step `done`, in training progress rather than in seconds
    (a step takes ~10 ms here, and the machine's load varies more than that):
    * ("during", k): as soon as checkpoint k is being written (its temporary folder exists);
    * ("after", k, d): d seconds after checkpoint k is in place, i.e. inside step k + 1, its checkpoint, or the
      epoch's evaluation;
    * ("final", d): d seconds after the last checkpoint: during the final evaluation, adapter or metrics save."""
    if done >= total or rng.random() < 0.1:
        return ("final", round(rng.uniform(0, 0.08), 3))
    k = rng.randint(done + 1, total)
    return ("during", k) if rng.random() < 0.4 else ("after", k, round(rng.uniform(0, 0.02), 3))


def _kill_at(proc: subprocess.Popen, out: Path, point: tuple, total: int) -> None:
    kind, k = point[0], point[1] if point[0] != "final" else total
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if _latest_step(out) >= k:
            if kind != "during":
                time.sleep(point[-1])
            break
        if kind == "during" and any((out / "checkpoints").glob(f".tmp-step-{k:08d}-*")):
            break
        time.sleep(0.001)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)


def test_sigkill_during_training_then_resume_is_bit_identical(run_setup, tmp_path):
    root, model_dir, config = run_setup
    started = time.monotonic()

    def probe():
        base = load_base_model(ModelSource(str(model_dir)), TASKS["cls"], LABELS)
        peft_model = get_peft_model(base, IA3Config(task_type=TASKS["cls"].peft_task_type))
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=0.05)
        from transformers import get_linear_schedule_with_warmup

        return peft_model, optimizer, get_linear_schedule_with_warmup(optimizer, 0, 12)

    ref = tmp_path / "reference"  # the uninterrupted run
    proc = _launch(config, ref, False, tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    reference = load_file(ref / "adapter_model.safetensors")
    total = json.loads((ref / "metrics.json").read_text())["step"]

    rng = random.Random(SEED)
    kills, runs, chains, outcomes, leftovers = 0, 0, 0, [], 0
    while kills < MIN_KILLS:  # chains of runs: start, kill, resume, kill the resumed run, ..., resume to the end
        assert runs < 40, f"only {kills} kills landed in {runs} runs"
        chains += 1
        out = tmp_path / f"chain{chains}"
        resume, chain_kills = False, 0
        while True:
            done = _latest_step(out) if resume else 0
            point = _kill_point(rng, done, total) if chain_kills < MAX_KILLS_PER_CHAIN else None
            launched_ns = time.time_ns()
            proc = _launch(config, out, resume, tmp_path)
            runs += 1
            if point is not None:
                _wait_for(proc, out / "recipe.yaml", launched_ns)
                _kill_at(proc, out, point, total)
            _, err = proc.communicate(timeout=300)
            if proc.returncode == -signal.SIGKILL:
                kills += 1
                chain_kills += 1
                outcomes.append((done, point, _check_latest(out, probe)))
                # killed before the first checkpoint: nothing to resume (--resume would say so), start afresh
                resume = find_checkpoint(out) is not None
                continue
            assert proc.returncode == 0, err[-3000:]
            break
        resumed = load_file(out / "adapter_model.safetensors")
        assert resumed.keys() == reference.keys()
        for key in reference:
            assert torch.equal(resumed[key], reference[key]), f"chain {chains}: {key} differs after resuming"
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [h["epoch"] for h in history] == [0, 1], "metrics.jsonl must hold one line per epoch"
        assert json.loads((out / "metrics.json").read_text())["step"] == history[-1]["step"]
        # the files of an uninterrupted run; kills may leave hidden temp files of atomic writes beside them, but no
        # half-written checkpoint folder
        files, hidden = set(), set()
        for path in out.rglob("*"):
            if path.is_file():
                (hidden if any(part.startswith(".") for part in path.relative_to(out).parts) else files).add(
                    str(path.relative_to(out))
                )
        assert files == {str(p.relative_to(ref)) for p in ref.rglob("*") if p.is_file()}
        assert all(re.fullmatch(r"\.[\w.]+\.\w+\.tmp", name) for name in hidden), hidden
        leftovers += len(hidden)
    print(
        f"\n{kills} kills in {runs} runs over {chains} chains ({time.monotonic() - started:.0f} s; {leftovers} temp "
        "files of atomic writes left over); "
        f"(resumed from step, kill point, latest after the kill) per kill:\n" + "\n".join(map(str, outcomes))
    )


# -- (b) kill while saving --------------------------------------------------------------------------------------------
SERVER = textwrap.dedent(
    """
    import os, sys
    import torch
    from torch import nn
    torch.set_num_threads(1)
    from ia3 import IA3Config, get_peft_model
    from ia3.serialization import save_tensors

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(64, 256)
            self.head = nn.Linear(256, 8192)  # an 8 MB head, trained in full: makes each save take a while
        def forward(self, x):
            return self.head(self.body(x))

    def peft_model():
        return get_peft_model(Net(), IA3Config(target_modules=["body"], modules_to_save=["head"]))

    def loop(mode, folder):
        if mode == "tensors":
            big = torch.empty(4 * 1024 * 1024)
            i = 0
            while True:
                i += 1
                big.fill_(float(i))
                save_tensors({"w": big, "i": torch.tensor([i])}, os.path.join(folder, "adapter_model.safetensors"),
                             metadata={"i": str(i)})
        model = peft_model()
        i = 0
        while True:
            i += 1
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.fill_(float(i))
            model.save_pretrained(folder)

    print("ready", flush=True)
    for line in sys.stdin:
        mode, folder = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                loop(mode, folder)
            finally:
                os._exit(1)
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)
    """
)
TEMP_FILE = re.compile(r"\.(adapter_model\.safetensors|adapter_config\.json|README\.md)\.[A-Za-z0-9_]+\.tmp")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(64, 256)
        self.head = torch.nn.Linear(256, 8192)


def _check_folder(folder: Path, mode: str) -> tuple[bool, int]:
    """Returns (target present, number of leftover temp files)."""
    names = {p.name for p in folder.iterdir()}
    targets = {WEIGHTS_NAME} if mode == "tensors" else {WEIGHTS_NAME, "adapter_config.json", "README.md"}
    leftovers = names - targets
    assert all(TEMP_FILE.fullmatch(n) for n in leftovers), leftovers  # hidden, and not *.safetensors / *.json
    weights = folder / WEIGHTS_NAME
    if mode == "tensors":
        if not weights.exists():
            return False, len(leftovers)
        tensors = load_tensors(weights)  # complete: raises on a truncated file
        i = int(tensors["i"][0])
        assert tensors["w"].shape == (4 * 1024 * 1024,) and bool((tensors["w"] == i).all()), "a torn write"
        return True, len(leftovers)
    if weights.exists():
        tensors = load_tensors(weights)
        assert tensors.keys() == {
            "base_model.model.body.ia3_l",
            "base_model.model.head.weight",
            "base_model.model.head.bias",
        }
        i = tensors["base_model.model.body.ia3_l"].flatten()[0]
        assert all(bool((t == i).all()) for t in tensors.values()), "tensors from different saves in one file"
    config = folder / "adapter_config.json"
    if config.exists():
        assert IA3Config.from_pretrained(folder).modules_to_save == ["head"]
    if weights.exists() and config.exists():
        loaded = PeftModel.from_pretrained(_Net(), folder)
        assert torch.equal(
            loaded.base_model.model.head.modules_to_save["default"].bias, tensors["base_model.model.head.bias"]
        )
    else:  # a half-saved adapter is refused, never loaded from a temp file
        with pytest.raises(FileNotFoundError):
            PeftModel.from_pretrained(_Net(), folder)
    return weights.exists() and config.exists(), len(leftovers)


@pytest.mark.parametrize("mode", ["tensors", "adapter"])
def test_sigkill_while_saving_never_leaves_a_truncated_file(tmp_path, mode):
    trials = 25
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp_path),
        cwd=tmp_path,
    )
    try:
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
        rng = random.Random(f"{SEED}-{mode}")
        present = leftovers = mid_write = 0
        for trial in range(trials):
            folder = tmp_path / f"t{trial}"
            folder.mkdir()
            server.stdin.write(f"{mode} {folder}\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.6))
            os.kill(pid, signal.SIGKILL)
            assert server.stdout.readline().strip() == "reaped"
            has, left = _check_folder(folder, mode)
            present += has
            leftovers += left
            mid_write += left > 0
    finally:
        server.stdin.close()
        server.kill()
        server.wait()
    print(
        f"\n{mode}: {trials} kills; a complete target after {present}, nothing after {trials - present}; "
        f"{mid_write} kills landed mid-write ({leftovers} temp files left)"
    )
    assert mid_write >= 1, "no kill landed inside a write: the test exercised nothing"
    assert present >= 1


def test_crash_between_logging_an_epoch_and_checkpointing_it(run_setup, tmp_path, monkeypatch):
    """The window the random kills above rarely hit: epoch 0 is logged to metrics.jsonl, then the run dies before
    its epoch-end checkpoint. The resumed run redoes the end of epoch 0 and logs it again; metrics.jsonl must still
    hold one line per epoch (it is rewritten from the checkpoint's history on resume)."""
    import ia3.recipe.train as train_module
    from ia3.recipe.config import build_config

    root, model_dir, config = run_setup
    cfg = build_config(config, {"output_dir": str(tmp_path / "run"), "train.checkpoint_every": "2"})
    real = train_module.save_checkpoint

    def dies_at_epoch_end(root_dir, step, peft_model, optimizer, scheduler, progress, **gathered):
        if progress["batches_done"] == 0:
            raise KeyboardInterrupt("killed after logging epoch 0")
        return real(root_dir, step, peft_model, optimizer, scheduler, progress, **gathered)

    monkeypatch.setattr(train_module, "save_checkpoint", dies_at_epoch_end)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(cfg, progress=False)
    logged = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0] and _latest_step(tmp_path / "run") == 4  # logged, but the last checkpoint is mid-epoch
    monkeypatch.setattr(train_module, "save_checkpoint", real)
    train_module.train(cfg, resume=True, progress=False)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]
