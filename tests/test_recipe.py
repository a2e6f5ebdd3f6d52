"""The recipe end to end on tiny models (offline), its data parsers, metrics and the T-Few losses."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_dirs import DEMO, make_model_dir

import ia3.recipe.train as train_module
from ia3.recipe.config import build_config
from ia3.recipe.data import DataError, decode_text_file, load_examples, parse_phrasebank
from ia3.recipe.inference import evaluate_run, predict
from ia3.recipe.losses import tfew_losses
from ia3.recipe.metrics import classification_report
from ia3.recipe.train import train

DATA = Path("/nonexistent")  # set by the small_data fixture (autouse below)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "financial_phrasebank" / "Sentences_AllAgree.txt"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: make_model_dir(root, kind) for kind in ("seq2seq", "causal", "cls")}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The first 150 rows of the bundled demo set (all three classes), to keep end-to-end runs short."""
    lines = DEMO.read_text(encoding="utf-8").splitlines(keepends=True)
    path = tmp_path_factory.mktemp("data") / "small.csv"
    path.write_text("".join(lines[:151]), encoding="utf-8")
    return path


def _cfg(out: Path, model: Path, task: str, **extra):
    overrides = {
        "output_dir": str(out),
        "model.name": str(model),
        "model.task": task,
        "data.dataset": str(DATA),
        "data.subset": "none",
        "data.text_column": "text",
        "train.epochs": "2",
        "train.batch_size": "16",
        "train.lr": "0.05",
        "train.eval_batch_size": "64",
    }
    overrides.update(extra)
    return build_config(overrides=overrides)


@pytest.fixture(autouse=True)
def _use_small_data(request, monkeypatch):
    if "model_dirs" in request.fixturenames:
        monkeypatch.setattr(sys.modules[__name__], "DATA", request.getfixturevalue("small_data"))


# -- data ----------------------------------------------------------------------------------------------------------
def test_phrasebank_parser_quirks():
    raw = "Sales rose @ 5 % in Q1 .@positive\r\n\r\nThe CEO e-mailed ceo@example.com .@neutral\r\nTulos heikkeni \xe4kkiä .@negative\r\n"
    rows = parse_phrasebank(decode_text_file(raw.encode("latin-1"), "x.txt"), "x.txt")
    assert rows == [
        ("Sales rose @ 5 % in Q1 .", "positive"),
        ("The CEO e-mailed ceo@example.com .", "neutral"),
        ("Tulos heikkeni äkkiä .", "negative"),
    ]
    # the same text as UTF-8 with LF line ends parses the same
    assert parse_phrasebank(decode_text_file(raw.replace("\r\n", "\n").encode("utf-8"), "y"), "y") == rows


def test_phrasebank_parser_names_bad_line():
    with pytest.raises(DataError, match=r"x.txt, line 3: expected 'sentence@label'"):
        parse_phrasebank("a@positive\n\nno label here\n", "x.txt")
    with pytest.raises(DataError, match="line 1"):
        parse_phrasebank("@positive\n", "x.txt")


@pytest.mark.skipif(not SHARED.is_file(), reason="needs ../shared/data/financial_phrasebank")
def test_real_phrasebank_file():
    ex = load_examples(str(SHARED))
    assert len(ex) == 2264
    assert ex.class_counts() == {"negative": 303, "neutral": 1391, "positive": 570}
    assert all("\r" not in t for t in ex.texts)


def test_demo_dataset():
    ex = load_examples("demo", text_column="text")
    assert len(ex) == 360 and ex.class_counts() == {"negative": 120, "neutral": 120, "positive": 120}


@pytest.mark.parametrize(
    "content, suffix, kwargs, message",
    [
        ("sentence,label\nfoo,positive\n", ".csv", {}, r"no column\(s\) \['text'\]"),
        ("text,label\n", ".csv", {}, "holds no examples"),
        ("text,label\nfoo,positive\nbar,positive\n", ".csv", {}, "at least two classes"),
        (
            "text,label\nfoo,positive\nbar,negative\n",
            ".csv",
            {"label_names": ["negative", "neutral"]},
            "record 1: unknown label 'positive'",
        ),
        ('{"text": "a", "label": "x"}\n{"text": "b", "label": \n', ".jsonl", {}, "line 2: invalid JSON"),
        ("text,label\n,positive\nb,negative\n", ".csv", {}, "record 1: empty or missing text"),
    ],
)
def test_data_errors(tmp_path, content, suffix, kwargs, message):
    path = tmp_path / f"data{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_examples(str(path), text_column="text", **kwargs)


def test_binary_file_is_refused(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"text,label\n\x00\x01\x02,positive\n")
    with pytest.raises(DataError, match="binary"):
        load_examples(str(path))


def test_integer_labels_need_names(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    with pytest.raises(DataError, match="label_names"):
        load_examples(str(path))
    ex = load_examples(str(path), label_names=["neg", "pos"])
    assert ex.labels == [0, 1]


# -- config --------------------------------------------------------------------------------------------------------
def test_config_layers_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n  epochs: 4\n")
    cfg = build_config(path, {"train.epochs": "7"})
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size) == (0.001, 7, 8)  # file < flags, defaults kept
    path.write_text("train:\n  lr: 8e-3\n")  # YAML 1.1 reads this as a string
    assert build_config(path).train.lr == 0.008
    path.write_text("train:\n  learning_rate: 0.001\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['train.learning_rate'\]"):
        build_config(path)
    with pytest.raises(ValueError, match="train.epochs"):
        build_config(overrides={"train.epochs": "0"})
    with pytest.raises(ValueError, match="takes an integer"):
        build_config(overrides={"train.epochs": "many"})


# -- metrics and losses --------------------------------------------------------------------------------------------
def test_classification_report_by_hand():
    report = classification_report([0, 0, 1, 1, 2], [0, 1, 1, -1, 2], ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert report["per_class"]["b"]["precision"] == 0.5 and report["per_class"]["b"]["recall"] == 0.5
    assert report["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert report["confusion"]["matrix"] == [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]


def test_tfew_losses_by_hand():
    # one example, two choices: gold has tokens with p=.5 and p=.8; the wrong one a single token with p=.25
    lp = torch.log(torch.tensor([[[0.5, 0.8], [0.25, 1.0]]]))
    mask = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    out = tfew_losses(lp, mask, torch.tensor([0]))
    lm = -(math.log(0.5) + math.log(0.8)) / 2
    ul = -math.log(1 - 0.25)
    beta_gold, beta_wrong = (math.log(0.5) + math.log(0.8)) / 2, math.log(0.25)
    ln = -(beta_gold - math.log(math.exp(beta_gold) + math.exp(beta_wrong)))
    assert out["lm"].item() == pytest.approx(lm, abs=1e-6)
    assert out["ul"].item() == pytest.approx(ul, abs=1e-6)
    assert out["ln"].item() == pytest.approx(ln, abs=1e-6)
    assert out["total"].item() == pytest.approx(lm + ul + ln, abs=1e-6)


# -- end to end ----------------------------------------------------------------------------------------------------
RUN_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "README.md",  # the model card save_pretrained writes
    "recipe.yaml",
    "metrics.jsonl",
    "metrics.json",
    "loss.png",
    "confusion_matrix.png",
    "checkpoints",
}


@pytest.mark.parametrize("task", ["seq2seq", "causal", "cls"])
def test_train_eval_predict(tmp_path, model_dirs, task):
    out = tmp_path / "run"
    extra = {"model.target_modules": "all-linear"} if task == "causal" else {}
    final = train(_cfg(out, model_dirs[task], task, **{"train.epochs": "3", **extra}), progress=False)
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert (out / "checkpoints" / "latest").read_text().strip() in {p.name for p in (out / "checkpoints").iterdir()}
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # the loss falls
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # eval of the saved adapter reproduces the training run's last evaluation, and predict its predictions
    metrics, predictions, examples = evaluate_run(out, progress=False)
    assert metrics["accuracy"] == pytest.approx(final["accuracy"], abs=1e-9)
    assert metrics["loss"] == pytest.approx(final["eval_loss"], rel=1e-5)
    predicted = predict(out, examples.texts)
    assert [p["label"] for p in predicted] == [p["label"] for p in predictions]
    correct = sum(p["label"] == examples.label_names[g] for p, g in zip(predicted, examples.labels))
    assert correct / len(examples) == pytest.approx(metrics["accuracy"])


def test_tfew_training_runs_and_learns(tmp_path, model_dirs):
    out = tmp_path / "tfew"
    train(
        _cfg(
            out, model_dirs["seq2seq"], "seq2seq", **{"train.loss": "tfew", "train.plots": "false", "train.epochs": "3"}
        ),
        progress=False,
    )
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


@pytest.mark.parametrize("task", ["cls", "seq2seq"])
def test_resume_after_interruption_is_bit_identical(tmp_path, model_dirs, monkeypatch, task):
    settings = {"train.checkpoint_every": "3", "train.plots": "false", "train.generation_eval": "false"}
    train(_cfg(tmp_path / "full", model_dirs[task], task, **settings), progress=False)

    real = train_module.save_checkpoint
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # mid-epoch 0: a checkpoint every 3 steps, 9 steps an epoch
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(train_module, "save_checkpoint", interrupted)
    cfg = _cfg(tmp_path / "resumed", model_dirs[task], task, **settings)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    assert not (tmp_path / "resumed" / "adapter_model.safetensors").exists()
    monkeypatch.setattr(train_module, "save_checkpoint", real)
    train(cfg, resume=True, progress=False)
    full, resumed = _tensors(tmp_path / "full"), _tensors(tmp_path / "resumed")
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    ones = [k for k, v in full.items() if k.endswith("ia3_l") and torch.equal(v, torch.ones_like(v))]
    assert not ones  # the vectors did train


def test_label_longer_than_target_length(tmp_path, model_dirs):
    cfg = _cfg(tmp_path / "x", model_dirs["seq2seq"], "seq2seq", **{"data.label_length": "1"})
    with pytest.raises(DataError, match=r"Label 'negative' is 2 tokens long .* data.label_length is 1"):
        train(cfg, progress=False)


def test_model_without_tokenizer(tmp_path, model_dirs):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(model_dirs["cls"], bare)
    for f in bare.iterdir():
        if "token" in f.name or f.name.endswith(".txt"):
            f.unlink()
    with pytest.raises(ValueError, match="tokenizer"):
        train(_cfg(tmp_path / "x", bare, "cls"), progress=False)


# -- CLI -----------------------------------------------------------------------------------------------------------
def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "ia3", "-q", *args], input=stdin, capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_train_predict_inspect(tmp_path, model_dirs, small_data):
    out = tmp_path / "cli"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model:\n  name: {model_dirs['cls']}\n  task: cls\ndata:\n  dataset: {small_data}\n  subset: null\n"
        "  text_column: text\ntrain:\n  epochs: 1\n  batch_size: 32\n  plots: false\n"
    )
    done = _cli("train", "--config", str(config), "--output-dir", str(out), "--lr", "0.05")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["output_dir"] == str(out) and 0 <= summary["accuracy"] <= 1
    saved = (out / "recipe.yaml").read_text()
    assert "lr: 0.05" in saved and "label_names:\n  - negative" in saved  # flags and resolved labels are saved
    done = _cli("predict", str(out), stdin="Net sales grew 12 percent.\n\nThe meeting is on Monday.\n")
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 0 and [r["text"] for r in rows] == [
        "Net sales grew 12 percent.",
        "The meeting is on Monday.",
    ]
    assert all(r["label"] in ("negative", "neutral", "positive") for r in rows)
    done = _cli("predict", str(out), "Net sales grew 12 percent.", "--mode", "rank")  # options after the texts
    assert done.returncode == 0 and json.loads(done.stdout)["label"] == rows[0]["label"]
    info = json.loads(_cli("inspect", str(out)).stdout)
    assert info["task_type"] == "SEQ_CLS" and info["layers"] == 8 and info["modules_to_save_parameters"] == 32 * 3 + 3


def test_cli_bad_input_is_a_clear_error(tmp_path, model_dirs):
    done = _cli(
        "train",
        "--model",
        str(model_dirs["cls"]),
        "--task",
        "cls",
        "--dataset",
        str(tmp_path / "nope.csv"),
        "--output-dir",
        str(tmp_path / "o"),
    )
    assert done.returncode == 2 and "nope.csv does not exist" in done.stderr
    done = _cli("train", "--train.epochs", "zero")
    assert done.returncode == 2 and "--train.epochs takes an integer" in done.stderr
    done = _cli("predict", str(tmp_path / "missing"), "text")
    assert done.returncode == 2 and "is not a folder" in done.stderr
    done = _cli("serve", "--model", "m", "--adapters", str(tmp_path), "--threads", "0")
    assert done.returncode == 2 and "--threads must be at least 1" in done.stderr


def test_financial_phrasebank_from_the_hub_zip(tmp_path, monkeypatch):
    """`financial_phrasebank` is read from the dataset's original zip (current `datasets` cannot run its script)."""
    import zipfile

    import huggingface_hub

    archive = tmp_path / "FinancialPhraseBank-v1.0.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(
            "FinancialPhraseBank-v1.0/Sentences_AllAgree.txt",
            "Profit rose .@positive\r\nSales fell .@negative\r\nThe AGM is in May .@neutral\r\n".encode("latin-1"),
        )
        zf.writestr("FinancialPhraseBank-v1.0/Sentences_50Agree.txt", "x@positive\r\ny@negative\r\n")
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs.get("repo_type")))
        return str(archive)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    ex = load_examples("financial_phrasebank", subset="sentences_allagree")
    assert calls == [("takala/financial_phrasebank", "data/FinancialPhraseBank-v1.0.zip", "dataset")]
    assert ex.texts == ["Profit rose .", "Sales fell .", "The AGM is in May ."] and ex.labels == [2, 0, 1]
    assert len(load_examples("financial_phrasebank", subset="sentences_50agree")) == 2
    with pytest.raises(DataError, match="subsets"):
        load_examples("financial_phrasebank", subset="sentences_90agree")


def test_parquet_and_jsonl_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"sentence": ["up a lot", "down a lot", "flat"], "y": ["pos", "neg", "pos"]}
    pq.write_table(pa.table(rows), tmp_path / "d.parquet")
    ex = load_examples(str(tmp_path / "d.parquet"), text_column="sentence", label_column="y")
    assert ex.label_names == ["neg", "pos"] and ex.labels == [1, 0, 1]
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"sentence": s, "y": y}) + "\n" for s, y in zip(*rows.values()))
    )
    assert load_examples(str(tmp_path / "d.jsonl"), text_column="sentence", label_column="y").texts == ex.texts


def test_merge_and_push_commands(tmp_path, model_dirs, small_data, monkeypatch):
    import huggingface_hub
    import transformers

    from ia3.recipe.adapters import merge_to_full_model, push_adapter

    out = tmp_path / "run"
    train(_cfg(out, model_dirs["cls"], "cls", **{"train.epochs": "1", "train.plots": "false"}), progress=False)
    merged_dir = merge_to_full_model(out, tmp_path / "merged")
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    assert not any("ia3" in name for name, _ in merged.named_parameters())
    _, predictions, examples = evaluate_run(out, progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(merged_dir)
    with torch.no_grad():
        logits = merged(**tok(examples.texts[:8], return_tensors="pt", padding=True)).logits
    assert [examples.label_names[i] for i in logits.argmax(-1).tolist()] == [p["label"] for p in predictions[:8]]
    with pytest.raises(FileExistsError):
        merge_to_full_model(out, merged_dir)

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            uploaded["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, allow_patterns=None, **kwargs):
            uploaded["files"] = sorted(
                p.name for p in Path(folder_path).iterdir() if any(p.match(pat) for pat in allow_patterns)
            )
            return "ok"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_adapter(out, "someone/finsent-ia3") == "ok"
    files = ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # the model card too; no metrics
    assert uploaded == {"repo": "someone/finsent-ia3", "files": files}


# -- zero-shot line, example sentences, training without validation ---------------------------------------------------
def test_zero_shot_evaluation_and_examples_are_printed_and_recorded(tmp_path, model_dirs, capsys):
    cfg = _cfg(
        tmp_path / "run",
        model_dirs["causal"],
        "causal",
        **{
            "train.epochs": "1",
            "train.plots": "false",
            "train.eval_before_training": "true",
            "train.show_examples": "4",
        },
    )
    final = train(cfg, progress=True)
    out = capsys.readouterr().out
    assert "before training (the base model alone): eval_ppl=" in out
    zero = final["zero_shot"]
    assert set(zero) == {"accuracy", "macro_f1", "generation_accuracy", "eval_loss"}
    assert zero["eval_loss"] != final["eval_loss"]  # the zero-shot figures are the base's, not the adapter's
    shown = out.split("examples (gold -> rank classification, generated):\n")[1].splitlines()[:4]
    golds = {line.split("->")[0].strip() for line in shown}
    assert len(shown) == 4 and golds == {"negative", "neutral", "positive"}  # round-robin: every class shows


def test_val_split_zero_trains_on_everything_without_evaluation(tmp_path, model_dirs):
    out = tmp_path / "all"
    cfg = _cfg(
        out,
        model_dirs["seq2seq"],
        "seq2seq",
        **{"data.val_split": "0", "train.epochs": "1", "train.plots": "false", "train.eval_before_training": "true"},
    )
    final = train(cfg, progress=False)
    assert "accuracy" not in final and "zero_shot" not in final and final["train_loss"] > 0
    assert (out / "adapter_model.safetensors").is_file()
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert set(record) == {"epoch", "step", "train_loss", "train_ppl", "train_seconds"}


def test_max_train_samples_trains_on_the_first_examples_and_keeps_the_validation_split(tmp_path, model_dirs):
    settings = {"train.epochs": "1", "train.plots": "false", "train.generation_eval": "false"}
    whole = train(_cfg(tmp_path / "whole", model_dirs["causal"], "causal", **settings), progress=False)
    part = train(
        _cfg(tmp_path / "part", model_dirs["causal"], "causal", **settings, **{"train.max_train_samples": "20"}),
        progress=False,
    )
    assert part["step"] == 2 and whole["step"] > 2  # 20 examples in batches of 16
    # the same validation examples: the same support per gold class
    support = {name: c["support"] for name, c in whole["per_class"].items()}
    assert {name: c["support"] for name, c in part["per_class"].items()} == support and sum(support.values()) > 0
