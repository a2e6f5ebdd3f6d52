"""Training on several processes (`accelerate launch`, CPU + gloo) gives the adapter of one process, written once.

Each process trains on `global_batch[rank::world]` and the loss is a sum over the step's units, so two processes
follow the single-process trajectory up to float rounding (per-slice padding and a different summation order).
The tiny models here have dropout switched off: with dropout, each process draws its own masks for its own rows, a
legitimate difference that no split can avoid.

On a machine without a GPU, `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate 1.x runs
`--cpu` through its simple launcher; several CPU processes need `mpirun`), so the launches here use the shipped DDP
config, configs/accelerate/ddp.yaml (torch.distributed.run, as `--multi_gpu`), for which ia3's trainer asks accelerate
for the CPU and gloo itself. The FSDP and DeepSpeed configs need GPUs (and deepspeed): they are checked here for
validity only; scripts/gpu_check.sh runs them on a GPU machine.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_dirs import DEMO, make_model_dir

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "accelerate"
VENV_BIN = Path(sys.executable).parent
ACCELERATE = shutil.which("accelerate", path=str(VENV_BIN)) or shutil.which("accelerate")
EPOCHS = 2
CHECKPOINT_EVERY = 2


def _env(tmp: Path) -> dict[str, str]:
    return {
        "PATH": f"{VENV_BIN}:/usr/bin:/bin",
        "HOME": str(tmp),
        "HF_HOME": str(tmp / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONHASHSEED": "0",
    }


def no_dropout_model(root: Path, kind: str) -> Path:
    path = make_model_dir(root, kind)
    config = json.loads((path / "config.json").read_text())
    for key in (
        "dropout_rate",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "classifier_dropout",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
    ):
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
    return root, data, {kind: no_dropout_model(root / "models", kind) for kind in ("cls", "seq2seq", "causal")}


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


def _run(cmd: list[str], tmp: Path, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp), timeout=400, cwd=tmp)
    if ok:
        assert done.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-6000:]}"
    return done


def _launch_two(*args: str, script: list[str] | None = None, config: str = "ddp") -> list[str]:
    return [
        ACCELERATE,
        "launch",
        "--config_file",
        str(CONFIGS / f"{config}.yaml"),
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_cpu_threads_per_process",
        "1",
        "--main_process_port",
        str(_free_port()),
        *(script or ["-m", "ia3", "-q", "train"]),
        *args,
    ]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _expected_files(steps_per_epoch: int) -> set[str]:
    steps = {
        s for s in range(1, EPOCHS * steps_per_epoch + 1) if s % steps_per_epoch == 0 or s % CHECKPOINT_EVERY == 0
    }  # epoch ends and every N steps
    kept = sorted(steps)[-2:]  # checkpoint.KEEP
    files = {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",  # the model card save_pretrained writes (also in each checkpoint's adapter/)
        "recipe.yaml",
        "metrics.jsonl",
        "metrics.json",
        "checkpoints/latest",
    }
    for s in kept:
        files |= {
            f"checkpoints/step-{s:08d}/{name}"
            for name in (
                "adapter/adapter_config.json",
                "adapter/adapter_model.safetensors",
                "adapter/README.md",
                "trainer_state.json",
                "trainer_state.safetensors",
            )
        }
    return files


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="needs the accelerate CLI")
@pytest.mark.parametrize("task", ["cls", "seq2seq"])
def test_two_processes_match_one(setup, tmp_path, task):
    root, data, models = setup
    config = _config(tmp_path, models[task], task, data)
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "ia3", "-q", "train", "--config", str(config), "--output-dir", str(one)], tmp_path)
    _run(_launch_two("--config", str(config), "--output-dir", str(two)), tmp_path)

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
    assert (two / "recipe.yaml").read_text().replace(str(two), "") == (one / "recipe.yaml").read_text().replace(
        str(one), ""
    )


def _adapters_close(a_dir: Path, b_dir: Path, atol: float) -> float:
    a, b = load_file(a_dir / "adapter_model.safetensors"), load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=atol, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _rewind(run: Path, to: Path, step: int) -> None:
    """A copy of a finished run as a crash after checkpoint `step` leaves it: `latest` names that checkpoint and the
    final files are not written yet."""
    shutil.copytree(run, to)
    (to / "checkpoints" / "latest").write_text(f"step-{step:08d}\n")
    for name in ("adapter_model.safetensors", "adapter_config.json", "metrics.json"):
        (to / name).unlink()


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="needs the accelerate CLI")
@pytest.mark.parametrize("task", ["seq2seq", "causal"])
def test_fsdp_matches_one_process_and_resumes(setup, tmp_path, task):
    """`ia3 train` under configs/accelerate/fsdp.yaml on 2 CPU processes (gloo; ia3 applies FSDP2's fully_shard
    itself, since accelerate has no FSDP without GPUs): each process holds half the model, the adapter is the
    one-process adapter within fp32 rounding, the checkpoints hold whole tensors (the files one process writes), and
    a run resumed from a mid-run checkpoint ends bit-identical under FSDP and within rounding on one process."""
    root, data, models = setup
    config = _config(tmp_path, models[task], task, data)
    one, two = tmp_path / "one", tmp_path / "fsdp"
    # with the base model's zero-shot evaluation before any training forward, and label generation (transformers'
    # seq2seq generate calls the encoder alone): both need the root unit's weights gathered (sharding.whole_root)
    evals = ["--train.eval_before_training", "true", "--train.generation_eval", "true"]
    single = [sys.executable, "-m", "ia3", "-q", "train", "--config", str(config)]
    _run([*single, "--output-dir", str(one), *evals], tmp_path)
    _run(_launch_two("--config", str(config), "--output-dir", str(two), *evals, config="fsdp"), tmp_path)

    final_one, final_two = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    for key in ("generation_accuracy", "accuracy"):
        assert final_two[key] == final_one[key] and final_two["zero_shot"][key] == final_one["zero_shot"][key], key
    held = final_two["fsdp"]
    assert held["launch"] == "fsdp-cpu" and held["processes"] == 2
    assert 0.45 < held["held_fraction"] < 0.55, held  # every weight split in two (uneven rows pad a little)
    diff = _adapters_close(one, two, atol=1e-5)
    print(f"\n{task}: max |adapter(1 process) - adapter(FSDP, 2 processes)| = {diff:.3g}")
    trained = load_file(two / "adapter_model.safetensors").items()
    assert [k for k, v in trained if k.endswith("ia3_l") and not torch.equal(v, torch.ones_like(v))], "no training"

    steps_per_epoch = -(-90 // 16)
    assert _files(two) == _files(one) == _expected_files(steps_per_epoch)
    last = f"step-{EPOCHS * steps_per_epoch:08d}"
    ckpt_one = load_file(one / "checkpoints" / last / "trainer_state.safetensors")
    ckpt_two = load_file(two / "checkpoints" / last / "trainer_state.safetensors")
    assert ckpt_one.keys() == ckpt_two.keys()
    for key in ckpt_one:
        assert ckpt_two[key].shape == ckpt_one[key].shape, key  # whole moments, not a shard
        if key.startswith("state."):
            torch.testing.assert_close(ckpt_two[key], ckpt_one[key], atol=1e-5, rtol=1e-3)

    # a crash after the second-to-last checkpoint, resumed under FSDP: the uninterrupted FSDP run, bit for bit
    middle = EPOCHS * steps_per_epoch - CHECKPOINT_EVERY  # the earlier of the two kept checkpoints
    resumed = tmp_path / "resumed"
    _rewind(two, resumed, middle)
    _run(_launch_two("--config", str(config), "--output-dir", str(resumed), "--resume", config="fsdp"), tmp_path)
    a, b = load_file(two / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len((resumed / "metrics.jsonl").read_text().splitlines()) == EPOCHS
    # the same FSDP checkpoint resumed on one process: the one-process run, within rounding
    alone = tmp_path / "alone"
    _rewind(two, alone, middle)
    _run([*single, "--output-dir", str(alone), "--resume"], tmp_path)
    _adapters_close(one, alone, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="needs the accelerate CLI")
def test_two_processes_are_two(setup, tmp_path):
    """The launch above really runs two ranks: a batch of 15 cannot be split between them."""
    root, data, models = setup
    config = _config(tmp_path, models["cls"], "cls", data)
    done = _run(
        _launch_two("--config", str(config), "--output-dir", str(tmp_path / "x"), "--train.batch_size", "15"),
        tmp_path,
        ok=False,
    )
    assert done.returncode != 0 and "must be divisible by the 2 processes" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="needs the accelerate CLI")
def test_gpu_check_loop_runs_on_cpu(setup, tmp_path):
    """scripts/gpu_check_loop.py (the library in a plain accelerate loop, saved from a gathered state dict): one
    process and two DDP processes give the same adapter. gpu_check.sh runs it under FSDP and DeepSpeed on GPUs."""
    root, data, models = setup
    script = [str(ROOT / "scripts" / "gpu_check_loop.py"), "--model", str(models["cls"]), "--steps", "4"]
    one = _run([sys.executable, *script, "--out", str(tmp_path / "one")], tmp_path)
    two = _run(_launch_two("--out", str(tmp_path / "two"), script=script), tmp_path)
    r1, r2 = json.loads(one.stdout.strip().splitlines()[-1]), json.loads(two.stdout.strip().splitlines()[-1])
    assert (r1["world"], r2["world"]) == (1, 2) and r1["frozen_params_unchanged"] and r2["frozen_params_unchanged"]
    assert r2["losses"] == pytest.approx(r1["losses"], rel=1e-5)
    a, b = (
        load_file(tmp_path / "one" / "adapter_model.safetensors"),
        load_file(tmp_path / "two" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0)


# -- fast checks ---------------------------------------------------------------------------------------------------------
def test_accelerate_configs_are_valid():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    found = {p.stem: load_config_from_file(str(p)) for p in CONFIGS.glob("*.yaml")}
    assert set(found) == {"ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"}
    assert found["ddp"].distributed_type == DistributedType.MULTI_GPU
    fsdp = found["fsdp"]
    assert fsdp.distributed_type == DistributedType.FSDP
    assert fsdp.fsdp_config["fsdp_version"] == 2 and fsdp.fsdp_config["fsdp_reshard_after_forward"] is True
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    # what the CPU path cannot honour stays off (ia3.recipe.sharding refuses it)
    for key in ("fsdp_offload_params", "fsdp_cpu_ram_efficient_loading", "fsdp_activation_checkpointing"):
        assert fsdp.fsdp_config[key] is False, key
    for stage in (2, 3):
        cfg = found[f"deepspeed_zero{stage}"]
        assert cfg.distributed_type == DistributedType.DEEPSPEED
        assert cfg.mixed_precision is None  # with a DeepSpeed JSON, accelerate refuses mixed_precision in the YAML
        ds = json.loads((ROOT / cfg.deepspeed_config["deepspeed_config_file"]).read_text())
        assert ds["zero_optimization"]["stage"] == stage
        assert "optimizer" not in ds  # DeepSpeed steps only the optimizer we pass: the frozen base stays frozen
        assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto"
        if stage == 3:
            zero = ds["zero_optimization"]
            assert zero["stage3_gather_16bit_weights_on_model_save"] is True
            assert zero["stage3_param_persistence_threshold"] >= 16384  # (IA)^3 vectors stay whole on every process


class _Launch:
    def __init__(self, kind: str, fsdp2: bool = True):
        self.distributed_type, self.is_fsdp2 = kind, fsdp2


@pytest.mark.parametrize(
    "launch, env, message",
    [
        (_Launch("DEEPSPEED"), {}, r"not under DEEPSPEED: launch with configs/accelerate/ddp.yaml"),
        (_Launch("FSDP", fsdp2=False), {}, r"FSDP version 2 only .*fsdp_version: 2"),
        (_Launch("MULTI_CPU"), {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, r"FSDP version 2 only"),
        (
            _Launch("MULTI_CPU"),
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"},
            r"CPU processes \(gloo\) does not support fsdp_offload_params",
        ),
    ],
)
def test_train_refuses_launches_it_cannot_run(monkeypatch, tmp_path, launch, env, message):
    """ZeRO, FSDP version 1 and FSDP settings the CPU path cannot honour: a clear error before anything is loaded
    or written."""
    import ia3.recipe.train as train_module
    from ia3.recipe.config import build_config

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(train_module, "_accelerator", lambda cfg: launch)
    cfg = build_config(overrides={"output_dir": str(tmp_path / "o"), "data.dataset": "demo"})
    with pytest.raises(ValueError, match=message):
        train_module.train(cfg, progress=False)
    assert not (tmp_path / "o").exists()


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(4, 6)
        self.head = torch.nn.Linear(6, 2)


class _FSDPLike(torch.nn.Module):
    """A stand-in for torch FSDP's nesting: the model's modules sit under `_fsdp_wrapped_module`."""

    def __init__(self):
        super().__init__()
        self._fsdp_wrapped_module = _Net()


def test_save_pretrained_from_a_gathered_state_dict(tmp_path):
    """`save_pretrained(state_dict=accelerator.get_state_dict(model))`, as under FSDP/ZeRO-3 where the live parameters
    are shards: the adapter comes from the state dict, under the keys an unwrapped model has."""
    from ia3 import IA3Config, PeftModel, get_peft_model

    config = IA3Config(target_modules=["q"], modules_to_save=["head"])
    model = get_peft_model(_FSDPLike(), config)
    gathered = {k.replace("_fsdp_wrapped_module.", ""): torch.full_like(v, 7.0) for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "a", state_dict=gathered)
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert set(saved) == {"base_model.model.q.ia3_l", "base_model.model.head.weight", "base_model.model.head.bias"}
    assert all(bool((t == 7).all()) for t in saved.values())  # from the state dict, not the live (all-ones) vectors
    loaded = PeftModel.from_pretrained(_Net(), tmp_path / "a")  # and it fits the plain model
    assert bool((loaded.base_model.model.q.ia3_l["default"] == 7).all())
    del gathered["base_model.model.q.ia3_l.default"]
    with pytest.raises(ValueError, match=r"state_dict lacks 1 tensor.*q\.ia3_l\.default"):
        model.save_pretrained(tmp_path / "b", state_dict=gathered)
