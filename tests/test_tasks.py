"""The task module: encodings, losses with the LM head at label positions only, rank classification, generation.

References are the plain computations: the full-logits loss on right-padded rows (what the recipe did before, and
what a PEFT user writes), per-row runs without padding, and hand-written chat-template strings.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
import transformers as tf
from tiny_dirs import tokenizer as word_tokenizer

from ia3 import IA3Config, get_peft_model
from ia3.tasks import TASKS, CausalTask, ClassificationTask, LabelLengthError, Seq2SeqTask, get_task, pad_rows

SRC = Path(__file__).resolve().parent.parent / "src" / "ia3"
LABELS = ["negative", "neutral", "positive"]
TEXTS = ["Operating profit rose to EUR 13 mn", "Sales fell", "The company said it will cut jobs in Finland"]


def _causal(kind: str, tok, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=3,
            eos_token_id=1,
        )
        base = tf.LlamaForCausalLM(cfg)
    else:
        cfg = tf.GPT2Config(
            vocab_size=len(tok),
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=3,
            eos_token_id=1,
            pad_token_id=0,
        )
        base = tf.GPT2LMHeadModel(cfg)
    model = get_peft_model(base.eval(), IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    return model


def _seq2seq(tok, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tf.T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.0,
    )
    return get_peft_model(
        tf.T5ForConditionalGeneration(cfg).eval(), IA3Config(task_type="SEQ_2_SEQ_LM", init_ia3_weights=False)
    )


def _full_logits_loss(model, inputs: list[list[int]], answers: list[list[int]], pad: int) -> torch.Tensor:
    """The textbook causal LM loss: right-padded prompt + answer, logits everywhere, shift by one, CE on answers."""
    rows = [i + a for i, a in zip(inputs, answers)]
    labels = [[-100] * len(i) + a for i, a in zip(inputs, answers)]
    ids = pad_rows(rows, pad)
    mask = pad_rows([[1] * len(r) for r in rows], 0)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    target = pad_rows(labels, -100)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), target[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_causal_loss_with_head_at_label_positions_equals_full_logits(kind):
    tok = word_tokenizer()
    CausalTask.prepare_tokenizer(tok, "tiny")
    task = CausalTask(tok, prompt="{text}\nSentiment:")
    model = _causal(kind, tok)
    choices = task.encode_choices(LABELS, 4)
    inputs = task.encode(TEXTS, 64, reserve=4)
    gold = [2, 0, 1]
    assert len({len(i) for i in inputs}) == 3, "rows of different lengths, so padding matters"

    loss = task.loss_sum(model, task.train_batch(inputs, choices, gold))
    loss.backward()
    fast = _grads(model)
    model.zero_grad()
    reference = _full_logits_loss(model, inputs, [choices[g] for g in gold], task.pad_id)
    reference.backward()
    slow = _grads(model)

    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert fast.keys() == slow.keys() and fast
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-6, msg=name)


def test_causal_head_only_at_the_label_tail(monkeypatch):
    """The LM head sees `width + 1` positions per row, not the whole prompt."""
    tok = word_tokenizer()
    CausalTask.prepare_tokenizer(tok, "tiny")
    task = CausalTask(tok, prompt="{text}\nSentiment:")
    model = _causal("llama", tok)
    seen = []
    head = model.get_base_model().lm_head
    head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    choices = task.encode_choices(LABELS, 4)
    inputs = task.encode(TEXTS, 64, reserve=4)
    task.loss_sum(model, task.train_batch(inputs, choices, [2, 0, 1]))
    width = max(len(c) for c in choices)
    assert seen == [width + 1] and max(len(i) for i in inputs) + width > width + 1


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_causal_choice_logprobs_equal_per_row_full_computation(kind):
    tok = word_tokenizer()
    CausalTask.prepare_tokenizer(tok, "tiny")
    task = CausalTask(tok, prompt="{text}\nSentiment:")
    model = _causal(kind, tok)
    choices = task.encode_choices(LABELS, 4)
    inputs = task.encode(TEXTS, 64, reserve=4)
    with torch.no_grad():
        lp, mask = task.choice_logprobs(model, inputs, choices, torch.device("cpu"))
        for b, inp in enumerate(inputs):
            for c, choice in enumerate(choices):
                logits = model(input_ids=torch.tensor([inp + choice])).logits[0].float().log_softmax(-1)
                expected = torch.stack([logits[len(inp) - 1 + t, tok_id] for t, tok_id in enumerate(choice)])
                got = lp[b, c][mask[b, c] > 0]
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    scores, nll, units = task.score(model, inputs, choices, torch.device("cpu"))
    torch.testing.assert_close(nll, -lp.sum(-1))
    torch.testing.assert_close(scores, lp.sum(-1) / mask.sum(-1))
    assert units.tolist() == [[len(c) for c in choices]] * len(inputs)


def test_seq2seq_loss_and_choice_logprobs_equal_the_models_own():
    tok = word_tokenizer()
    task = Seq2SeqTask(tok)
    model = _seq2seq(tok)
    choices = task.encode_choices(LABELS, 4)
    inputs = task.encode(TEXTS, 64)
    gold = [2, 0, 1]
    batch = task.train_batch(inputs, choices, gold)
    tokens = sum(len(choices[g]) for g in gold)
    assert task.loss_units(choices, gold) == tokens
    torch.testing.assert_close(task.loss_sum(model, batch) / tokens, model(**batch).loss)
    with torch.no_grad():
        lp, mask = task.choice_logprobs(model, inputs, choices, torch.device("cpu"))
        for b, inp in enumerate(inputs):
            for c, choice in enumerate(choices):
                out = model(input_ids=torch.tensor([inp]), labels=torch.tensor([choice]))
                torch.testing.assert_close(-(lp[b, c].sum()) / len(choice), out.loss, rtol=1e-5, atol=1e-6)


def test_classifier_scores_are_the_head_logits():
    tok = word_tokenizer()
    task = ClassificationTask(tok)
    torch.manual_seed(0)
    cfg = tf.BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=64,
        num_labels=3,
    )
    model = tf.BertForSequenceClassification(cfg).eval()
    inputs = task.encode(TEXTS, 64)
    scores, nll, units = task.score(model, inputs, [[], [], []], torch.device("cpu"))
    with torch.no_grad():
        for b, inp in enumerate(inputs):
            logits = model(input_ids=torch.tensor([inp])).logits[0]
            torch.testing.assert_close(scores[b], logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(nll[b], -logits.log_softmax(-1), rtol=1e-5, atol=1e-5)
    assert units.eq(1).all()
    batch = task.train_batch(inputs, [[], [], []], [2, 0, 1])
    assert task.loss_units([[], [], []], [2, 0, 1]) == 3
    torch.testing.assert_close(task.loss_sum(model, batch) / 3, model(**batch).loss)


def test_left_padded_generation_equals_each_row_alone():
    tok = word_tokenizer()
    CausalTask.prepare_tokenizer(tok, "tiny")
    task = CausalTask(tok, prompt="{text}\nSentiment:")
    model = _causal("llama", tok)
    inputs = task.encode(TEXTS, 64, reserve=4)
    together = task.generate(model, inputs, torch.device("cpu"), max_new_tokens=4)
    alone = [task.generate(model, [row], torch.device("cpu"), max_new_tokens=4)[0] for row in inputs]
    assert together == alone


def test_causal_prompt_parts_and_truncation_keep_the_prompt():
    tok = word_tokenizer()
    CausalTask.prepare_tokenizer(tok, "tiny")
    task = CausalTask(tok, prompt="Sentiment of {text} :")
    (ids,) = task.encode([" ".join(["profit"] * 50)], 20, reserve=4)
    words = tok.convert_ids_to_tokens(ids)
    assert len(ids) == 16 and words[:2] == ["Sentiment", "of"] and words[-1] == ":" and words.count("profit") == 13
    with pytest.raises(ValueError, match="no room"):
        task.encode(["x"], 5, reserve=4)


CHAT = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def test_chat_template_wraps_the_prompt_and_the_label_is_the_assistant_turn():
    tok = word_tokenizer()
    tok.chat_template = CHAT
    CausalTask.prepare_tokenizer(tok, "tiny")
    task = CausalTask(tok, prompt="{text}\nSentiment:", chat_template=True)
    (ids,) = task.encode(["Sales fell"], 64, reserve=4)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Sales fell\nSentiment:"}], tokenize=False, add_generation_prompt=True
    )
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    choices = task.encode_choices(LABELS, 4)
    # the assistant's turn: the label, then the template's end of turn (</s>, the EOS here); no leading space
    assert [tok.convert_ids_to_tokens(c) for c in choices] == [[n, "</s>"] for n in LABELS]
    plain = CausalTask(tok, prompt="{text}\nSentiment:")
    assert plain.encode(["Sales fell"], 64, reserve=4) != [ids]


def test_bad_settings_are_named():
    tok = word_tokenizer()
    CausalTask.prepare_tokenizer(tok, "tiny")
    with pytest.raises(ValueError, match="chat template"):
        CausalTask(tok, chat_template=True)  # this tokenizer has none
    with pytest.raises(ValueError, match=r"--data.prompt must contain '\{text\}'"):
        CausalTask(tok, prompt="no placeholder")
    with pytest.raises(ValueError, match="chat_template applies to causal"):
        Seq2SeqTask(tok, chat_template=True)
    with pytest.raises(LabelLengthError) as info:
        Seq2SeqTask(tok).encode_choices(["negative neutral positive"], 2)
    assert info.value.label == "negative neutral positive" and info.value.limit == 2
    with pytest.raises(ValueError, match="Unknown task 'tokens'"):
        get_task("tokens")


def test_registry_is_consistent():
    assert set(TASKS) == {"seq2seq", "causal", "cls"}
    assert {t.peft_task_type for t in TASKS.values()} == {"SEQ_2_SEQ_LM", "CAUSAL_LM", "SEQ_CLS"}
    for task in TASKS.values():
        assert hasattr(tf, task.auto_class)


def test_no_module_but_the_task_module_branches_on_the_task_name():
    pattern = re.compile(r"task (==|!=)|task in \(|\.task\s*(==|!=)")
    offenders = [
        f"{p.relative_to(SRC)}:{n}"
        for p in SRC.rglob("*.py")
        if p.name != "tasks.py"
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_the_server_imports_no_private_name_of_the_recipe():
    private = []
    for path in (SRC / "serve").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ia3.recipe"):
                private += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []
