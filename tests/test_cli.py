"""The command line and the configs behind it: flags and help derived from the dataclasses, values read by their
annotations, every problem in one error, close matches for unknown names, clean errors. No model is loaded: the
command functions are replaced by stubs that record what they were called with (but for one end-to-end `ia3 -q train`
of a tiny model in a subprocess, which must print its result and nothing else)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from ia3 import cli
from ia3.recipe.config import (
    GROUPS,
    DataArgs,
    ModelArgs,
    RecipeConfig,
    TrainArgs,
    build_config,
    settings,
)
from ia3.serve.config import ServeConfig, flag_name
from ia3.settings import ConfigError, coerce, field_docs
from ia3.tasks import TASKS

CONFIG_CLASSES = [*GROUPS.values(), RecipeConfig, ServeConfig]


@pytest.fixture
def calls(monkeypatch):
    """Stub `train` and `evaluate_run` (the modules the commands import them from); record their calls."""
    record: list[tuple[str, tuple, dict]] = []

    def train(cfg, **kwargs):
        record.append(("train", (cfg,), kwargs))
        return {"accuracy": 1.0}

    def evaluate_run(adapter, overrides, **kwargs):
        record.append(("eval", (adapter, overrides), kwargs))
        return {"accuracy": 1.0}, [], None

    monkeypatch.setitem(sys.modules, "ia3.recipe.train", types.SimpleNamespace(train=train))
    monkeypatch.setitem(sys.modules, "ia3.recipe.inference", types.SimpleNamespace(evaluate_run=evaluate_run))
    return record


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `ia3 ARGV` in this process."""
    try:
        code = cli.main(argv)
    except SystemExit as done:
        code = done.code
    out, err = capsys.readouterr()
    return code, out, err


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


# -- help ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("klass", CONFIG_CLASSES, ids=lambda k: k.__name__)
def test_every_field_is_documented(klass):
    docs = field_docs(klass)
    names = [f.name for f in dataclasses.fields(klass)]
    assert [n for n in names if len(docs.get(n, "").split()) < 2] == []  # a field without a doc fails here
    assert sorted(set(docs) - set(names)) == []  # and a doc of a field that is gone


def test_docstring_sections_are_parsed():
    @dataclass
    class Example:
        """Summary line.

        Attributes:
            alpha: first line
                continued: still alpha.
            beta / gamma: shared.

        Note:
            delta: not a field.
        """

        alpha: int = 0
        beta: int = 0
        gamma: int = 0

    assert field_docs(Example) == {"alpha": "first line continued: still alpha.", "beta": "shared.", "gamma": "shared."}


def test_every_flag_has_help():
    for name, sub in _subparsers(cli.build_parser()).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = (action.help or "").split("(default:")[0].strip()
            assert len(text.split()) >= 2, (name, action.option_strings or action.dest, action.help)


def test_train_help_shows_the_field_docs(capsys):
    code, out, _ = _run(["train", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())  # argparse wraps lines
    for s in settings():
        assert f"--{s.key}" in text
        assert " ".join(s.help.split()) in text, s.key
    assert "AdamW's peak learning rate" in text and "(default: 0.008)" in text
    assert "--model.task {" + ",".join(TASKS) + "}" in text


# -- unknown names -------------------------------------------------------------------------------------------------
def test_unknown_flag_suggests_close_match(capsys, calls):
    code, _, err = _run(["train", "--train.lrr", "1"], capsys)
    assert code == 2 and not calls
    assert "--train.lrr" in err and "did you mean --train.lr?" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2  # the short usage line, then the error
    code, _, err = _run(["train", "--train.max_length", "64"], capsys)  # the right name in another section
    assert code == 2 and "did you mean --data.max_length?" in err


def test_unknown_yaml_key_suggests_close_match(tmp_path, capsys, calls):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lrr: 1\n")
    code, _, err = _run(["train", "--config", str(path)], capsys)
    assert code == 2 and not calls
    assert "unknown key(s) ['train.lrr']" in err and "did you mean train.lr?" in err and "Traceback" not in err
    path.write_text("lr: 1\nmodle:\n  name: x\n")
    with pytest.raises(ConfigError) as info:
        build_config(path)
    assert len(info.value.problems) == 2
    assert "did you mean train.lr (under `train:`)" in str(info.value) and "did you mean model?" in str(info.value)
    with pytest.raises(ValueError, match=r"unknown setting --data.val_splt; did you mean --data.val_split"):
        build_config(overrides={"data.val_splt": "0.2"})


# -- reading values by their annotations ---------------------------------------------------------------------------
def test_flag_values_follow_the_annotations(capsys, calls):
    code, out, err = _run(
        [
            "train",
            "--output-dir",
            "o",
            "--model",
            "m",
            "--data.label_names",
            "neg, pos",
            "--model.target_modules",
            "q,v",
            "--model.feedforward_modules",
            "v",
            "--train.max_eval_samples",
            "5",
            "--lr",
            "3e-3",
            "--train.plots",
            "false",
            "--model.trust_remote_code",
            "--data.subset",
            "none",
            "--data.dataset",
            "none",
            "--train.epochs",
            "2",
        ],
        capsys,
    )
    assert code == 0, err
    cfg = calls[0][1][0]
    assert cfg.output_dir == "o" and cfg.model.name == "m"
    assert cfg.data.label_names == ["neg", "pos"]
    assert cfg.model.target_modules == ["q", "v"] and cfg.model.feedforward_modules == ["v"]  # names, not a regex
    assert cfg.train.max_eval_samples == 5 and cfg.train.epochs == 2
    assert cfg.train.lr == 0.003 and isinstance(cfg.train.lr, float)
    assert cfg.train.plots is False and cfg.model.trust_remote_code is True  # a bare bool flag is true
    assert cfg.data.subset is None  # Optional: none is None
    assert cfg.data.dataset == "none"  # not Optional: the string
    cfg = build_config(
        overrides={
            "model.target_modules": "all-linear",
            "model.feedforward_modules": r".*\.wo",
            "data.label_names": "only",
            "train.max_eval_samples": "null",
        }
    )
    assert cfg.model.target_modules == "all-linear" and cfg.model.feedforward_modules == r".*\.wo"
    assert cfg.data.label_names == ["only"]
    assert cfg.train.max_eval_samples is None


def test_yaml_values_follow_the_annotations(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  target_modules: [q, v]\n  revision: 2024\ndata:\n  label_names: a,b\n  subset: null\n"
        "  val_split: 0\ntrain:\n  lr: 8e-3\n  weight_decay: 0\n  plots: no\n  max_eval_samples: 10\n"
    )
    cfg = build_config(path)
    assert cfg.train.lr == 0.008 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads `8e-3` as a string
    assert cfg.train.weight_decay == 0.0 and isinstance(cfg.train.weight_decay, float)
    assert cfg.train.plots is False and cfg.train.max_eval_samples == 10
    assert cfg.model.target_modules == ["q", "v"] and cfg.model.revision == "2024"
    assert cfg.data.label_names == ["a", "b"] and cfg.data.subset is None and cfg.data.val_split == 0.0
    path.write_text("train:\n  epochs: 2.5\n  plots: 1\ndata:\n  max_length: null\n  label_names: [1, 2]\n")
    with pytest.raises(ConfigError) as info:
        build_config(path)
    message = str(info.value)
    assert "train.epochs takes an integer; got 2.5" in message and "train.plots takes true or false; got 1" in message
    assert "data.max_length takes an integer; got None" in message and "data.label_names takes a list" in message


@pytest.mark.parametrize(
    "value, hint, expected",
    [
        ("none", int | None, None),
        ("NULL", list[str] | None, None),
        ("7", int | None, 7),
        ("yes", bool, True),
        ("0", bool, False),
        (" 2 ", int, 2),
        ("1e-3", float, 0.001),
        (3, float, 3.0),
        ("a,,b ,", list[str] | None, ["a", "b"]),
        ("a.*b", list[str] | str | None, "a.*b"),
        ("all-linear", list[str] | str | None, "all-linear"),
        ("wo", list[str] | str | None, ["wo"]),
        ("q, v", list[str] | str | None, ["q", "v"]),
        ("none", str, "none"),
        (5, str, "5"),
    ],
)
def test_coerce(value, hint, expected):
    out = coerce(value, hint, "--x")
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    "value, hint, words",
    [
        ("none", int, "an integer"),
        ("maybe", bool, "true or false"),
        ("1.5", int, "an integer"),
        ("fast", float | None, "a number or none"),
        (True, int, "an integer"),
        (None, str, "a string"),
    ],
)
def test_coerce_refuses(value, hint, words):
    with pytest.raises(ValueError, match=rf"^--x takes {words}; got "):
        coerce(value, hint, "--x")


# -- validation ----------------------------------------------------------------------------------------------------
def test_all_problems_in_one_error(tmp_path, capsys, calls):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  batch_size: 0\n")
    overrides = {
        "train.lr": "-1",
        "train.epochs": "0",
        "data.val_split": "1",
        "train.plots": "maybe",
        "model.task": "nope",
        "train.lrr": "1",
    }
    with pytest.raises(ConfigError) as info:
        build_config(path, overrides)
    problems = info.value.problems
    assert len(problems) == 7, problems
    for part in (
        "--train.lr must be a positive number; got -1",
        "--train.epochs must be an integer >= 1; got 0",
        "--data.val_split",
        "--train.plots takes true or false; got 'maybe'",
        "--model.task must be one of",
        "--train.lrr",
        "--train.batch_size must be an integer >= 1",
    ):
        assert sum(part in p for p in problems) == 1, part
    code, _, err = _run(["train", "--train.lr", "-1", "--train.epochs", "x", "--data.max_length", "1"], capsys)
    assert code == 2 and not calls and "Traceback" not in err
    assert err.startswith("ia3 train: error: Invalid recipe config:")
    assert "--train.lr must" in err and "--train.epochs takes an integer" in err and "--data.max_length must" in err


def test_groups_check_themselves():
    with pytest.raises(ValueError, match=r"--train.lr must be a positive number; got -1"):
        TrainArgs(lr=-1)
    with pytest.raises(ValueError, match=r"--train.precision must be one of \['auto', 'fp32', 'bf16', 'fp16'\]"):
        TrainArgs(precision="fp8")
    with pytest.raises(ValueError, match=rf"--model.task must be one of {list(TASKS)!r}".replace("[", r"\[")):
        ModelArgs(task="translation")
    with pytest.raises(ValueError, match=r"--model.gguf_file must name a .gguf file"):
        ModelArgs(gguf_file="model.bin")
    with pytest.raises(ValueError, match=r"--data.label_names must be distinct"):
        DataArgs(label_names=["a", "a"])
    with pytest.raises(ValueError, match=r"--data.max_length takes an integer; got '64'"):
        DataArgs(max_length="64")
    assert ModelArgs(gguf_file="q4.gguf").gguf_file == "q4.gguf" and DataArgs(chat_template=True).chat_template


def test_cross_group_rules():
    classifier = next(name for name, task in TASKS.items() if not task.generates)
    with pytest.raises(
        ValueError, match=rf"--train.loss tfew needs a label-generation task.*got --model.task {classifier}"
    ):
        RecipeConfig(model=ModelArgs(task=classifier), train=TrainArgs(loss="tfew"))
    for name, task in TASKS.items():
        if task.generates:
            assert RecipeConfig(model=ModelArgs(task=name), train=TrainArgs(loss="tfew")).train.loss == "tfew"
    with pytest.raises(ValueError, match=r"--data.prompt must contain '\{text\}'.*\(--model.task causal\)"):
        RecipeConfig(model=ModelArgs(task="causal"), data=DataArgs(prompt="Sentiment:"))
    with pytest.raises(ValueError, match=r"--data.chat_template applies to causal .* not to task 'seq2seq'"):
        RecipeConfig(model=ModelArgs(task="seq2seq"), data=DataArgs(chat_template=True))
    assert RecipeConfig(model=ModelArgs(task="causal"), data=DataArgs(chat_template=True)).data.chat_template
    assert RecipeConfig(model=ModelArgs(task="seq2seq"), data=DataArgs(prompt="Sentiment:")).data.prompt == "Sentiment:"


@pytest.mark.parametrize(
    "value, ok", [("0", True), ("0.5", True), ("0.99", True), ("1", False), ("-0.1", False), ("nan", False)]
)
def test_val_split_range(value, ok, capsys, calls):
    code, _, err = _run(["train", "--data.dataset", "demo", "--data.val_split", value], capsys)
    if ok:
        assert code == 0, err
        assert calls[0][1][0].data.val_split == float(value)
    else:
        assert code == 2 and "--data.val_split must be a fraction, 0 <= val_split < 1" in err and not calls


# -- the commands --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, progress",
    [
        (["train"], True),
        (["train", "-q"], False),
        (["-q", "train"], False),
        (["train", "--quiet", "--train.epochs", "1"], False),
    ],
)
def test_quiet_before_or_after_the_command(argv, progress, capsys, calls):
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    assert calls[0][0] == "train" and calls[0][2]["progress"] is progress


def test_quiet_after_eval(tmp_path, capsys, calls):
    assert _run(["eval", str(tmp_path), "-q"], capsys)[0] == 0
    assert _run(["eval", str(tmp_path)], capsys)[0] == 0
    assert [c[2]["progress"] for c in calls] == [False, True]


@pytest.mark.parametrize(
    "error", [RuntimeError("CUDA out of memory"), OSError("disk full"), FileNotFoundError("no such model")]
)
def test_expected_errors_are_clean(monkeypatch, capsys, calls, error):
    def fails(cfg, **kwargs):
        raise error

    monkeypatch.setattr(sys.modules["ia3.recipe.train"], "train", fails)
    monkeypatch.delenv("IA3_DEBUG", raising=False)
    code, _, err = _run(["train", "-q"], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == f"ia3 train: error: {error}"
    assert "Traceback" not in err


@pytest.mark.parametrize("error", [TypeError("a bug"), KeyboardInterrupt()])
def test_bugs_and_interrupts_are_not_swallowed(monkeypatch, capsys, calls, error):
    def fails(cfg, **kwargs):
        raise error

    monkeypatch.setattr(sys.modules["ia3.recipe.train"], "train", fails)
    with pytest.raises(type(error)):
        cli.main(["train", "-q"])


# -- serve -----------------------------------------------------------------------------------------------------------
def _serve_args(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["serve", *argv])


def test_serve_has_a_flag_for_every_field():
    sub = _subparsers(cli.build_parser())["serve"]
    options = {o for a in sub._actions for o in a.option_strings}
    fields = [f.name for f in dataclasses.fields(ServeConfig)]
    assert [flag_name(f) for f in fields if flag_name(f) not in options] == []
    assert {
        "--model",
        "--adapters",
        "--task",
        "--label-names",
        "--api-key",
        "--no-hub",
        "--max-beams",
        "--max-labels",
        "--max-label-tokens",
        "--no-mix-adapters",
        "--gguf-file",
        "--host",
        "--port",
        "--log-level",
        "--threads",
    } <= options
    task = next(a for a in sub._actions if "--task" in a.option_strings)
    assert list(task.choices) == list(TASKS)


def test_serve_flags_make_the_config(monkeypatch):
    monkeypatch.setenv("IA3_API_KEY", "from-env")
    config = cli.serve_config(
        _serve_args(
            "--model",
            "m",
            "--adapters",
            "a",
            "--task",
            "cls",
            "--label-names",
            "x, y",
            "--max-beams",
            "2",
            "--max-labels",
            "3",
            "--max-label-tokens",
            "4",
            "--max-wait-ms",
            "2.5",
            "--no-hub",
            "--no-mix-adapters",
            "--gguf-file",
            "q.gguf",
        )
    )
    assert config == ServeConfig(
        model="m",
        adapters_dir="a",
        task="cls",
        label_names=["x", "y"],
        max_beams=2,
        max_labels=3,
        max_label_tokens=4,
        max_wait_ms=2.5,
        allow_hub=False,
        mix_adapters=False,
        gguf_file="q.gguf",
        api_key="from-env",
    )
    assert cli.serve_config(_serve_args("--model", "m", "--adapters", "a", "--api-key", "k")).api_key == "k"
    monkeypatch.delenv("IA3_API_KEY")
    defaults = cli.serve_config(_serve_args("--model", "m", "--adapters", "a"))
    assert defaults == ServeConfig(model="m", adapters_dir="a")  # the dataclass's defaults, not the CLI's


def test_serve_flag_problems_together(capsys):
    with pytest.raises(ConfigError) as info:
        cli.serve_config(
            _serve_args(
                "--model",
                "m",
                "--adapters",
                "a",
                "--max-beams",
                "many",
                "--max-queue",
                "0",
                "--request-timeout-s",
                "0",
                "--label-names",
                "a,a",
                "--burst-prefill",
                "0.5",
            )
        )
    assert len(info.value.problems) == 5
    assert "--burst-prefill must be a number from 1 to 64; got 0.5" in str(info.value)
    assert "--max-beams takes an integer; got 'many'" in str(info.value)
    assert "--max-queue must be an integer >= 1; got 0" in str(info.value)
    assert "--request-timeout-s must be a number > 0" in str(info.value) and "--label-names must be distinct" in str(
        info.value
    )
    code, _, err = _run(["serve", "--model", "m", "--adapters", "a", "--task", "nope"], capsys)
    assert code == 2 and "invalid choice: 'nope'" in err


def test_serve_command_runs_the_config(monkeypatch, capsys):
    pytest.importorskip("fastapi")
    import ia3.serve.app

    seen = {}
    monkeypatch.setattr(ia3.serve.app, "run", lambda config, **kwargs: seen.update(config=config, **kwargs))
    code, _, err = _run(
        ["serve", "--model", "m", "--adapters", "a", "--max-beams", "3", "--port", "9000", "-q"], capsys
    )
    assert code == 0, err
    assert seen["config"].max_beams == 3 and seen["port"] == 9000 and seen["host"] == "127.0.0.1"
    code, _, err = _run(["serve", "--model", "m", "--adapters", "a", "--max-beams", "0"], capsys)
    assert code == 2 and "ia3 serve: error: Invalid serve config: --max-beams must be an integer >= 1; got 0" in err


def test_serve_config_messages_name_flags():
    with pytest.raises(ValueError) as info:
        ServeConfig(model="", task="x", max_batch_size=0, api_key="")
    for part in ("--model must", "--task must be one of", "--max-batch-size must be an integer >= 1", "--api-key must"):
        assert part in str(info.value)


def test_saved_config_reads_back_the_same(tmp_path):
    import pickle

    cfg = build_config(
        overrides={
            "model.target_modules": "q,v",
            "data.label_names": "a,b",
            "data.subset": "none",
            "train.lr": "3e-3",
            "train.max_eval_samples": "4",
            "data.val_split": "0",
        }
    )
    cfg.save(tmp_path / "recipe.yaml")
    assert build_config(tmp_path / "recipe.yaml") == cfg
    assert build_config(base=cfg.to_dict()) == cfg
    with pytest.raises(ConfigError) as info:
        build_config(overrides={"train.lr": "0", "train.epochs": "0"})
    again = pickle.loads(pickle.dumps(info.value))  # e.g. out of a worker process
    assert again.problems == info.value.problems and str(again) == str(info.value)


def test_config_names_a_bundled_config(tmp_path, monkeypatch):
    from ia3 import cli

    assert cli.bundled_config(Path("minilm")) == cli.BUNDLED_CONFIGS / "minilm.yaml"
    assert cli.DEMO_CONFIG == cli.BUNDLED_CONFIGS / "smollm2.yaml" and cli.DEMO_CONFIG.is_file()
    own = tmp_path / "minilm"  # a file of that name wins over the bundled config
    own.write_text("train: {epochs: 1}\n")
    monkeypatch.chdir(tmp_path)
    assert cli.bundled_config(Path("minilm")) == Path("minilm")
    with pytest.raises(ValueError, match=r"--config nosuch: no such file, and no bundled config.*'minilm', 'smollm2'"):
        cli.bundled_config(Path("nosuch"))
    assert cli.bundled_config(Path("missing.yaml")) == Path("missing.yaml")  # a path: build_config names it


def test_serve_prompt_settings_are_checked_by_the_task_in_serve_flags():
    from ia3.serve.config import ServeConfig

    with pytest.raises(ValueError, match=r"--prompt must contain '\{text\}'"):
        ServeConfig(model="m", task="causal", prompt="no placeholder")
    with pytest.raises(ValueError, match=r"--chat-template applies to causal .* not to task 'seq2seq'"):
        ServeConfig(model="m", task="seq2seq", chat_template=True)
    assert ServeConfig(model="m", task="causal", prompt="{text}\nSentiment:", chat_template=True).chat_template


def test_quiet_train_prints_only_the_result(tmp_path):
    """`ia3 -q train` of an unquantised tiny model: one JSON result line on stdout and not a byte on stderr (no
    bitsandbytes, torchao or torch notice, no progress bar), although those backends are installed here."""
    from tiny_dirs import DEMO, make_model_dir

    model = make_model_dir(tmp_path / "models", "cls")
    data = tmp_path / "data.csv"
    data.write_text("".join(DEMO.read_text(encoding="utf-8").splitlines(keepends=True)[:41]), encoding="utf-8")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'out'}\nmodel:\n  name: {model}\n  task: cls\n"
        f"data:\n  dataset: {data}\n  subset: null\n  text_column: text\n  val_split: 0.25\n"
        "train:\n  epochs: 1\n  batch_size: 16\n  plots: false\n  generation_eval: false\n  precision: fp32\n"
    )
    src = str(Path(cli.__file__).resolve().parent.parent)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "ia3", "-q", "train", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    result = json.loads(lines[0])
    assert result["output_dir"] == str(tmp_path / "out") and 0 <= result["accuracy"] <= 1
