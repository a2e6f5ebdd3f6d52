"""Tiny models saved as folders with a word-level tokenizer (built from the bundled demo data), for end-to-end
tests of the recipe and CLI. Nothing is downloaded."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

DEMO = Path(__file__).resolve().parent.parent / "src" / "ia3" / "demo" / "finsent.csv"
SPECIAL = ["<pad>", "</s>", "<unk>", "<s>"]


def _vocab() -> dict[str, int]:
    words: set[str] = {"negative", "neutral", "positive", "Sentiment", ":", "\n"}
    with open(DEMO, encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            words.update(re.findall(r"\w+|[^\w\s]", row["text"]))
    return {w: i for i, w in enumerate(SPECIAL + sorted(words))}


def tokenizer() -> tf.PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab=_vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>"
    )


def make_model_dir(root: Path, kind: str, seed: int = 0) -> Path:
    """Save a tiny `kind` ("seq2seq", "causal" or "cls") model plus tokenizer into `root/kind`; returns the path."""
    torch.manual_seed(seed)
    tok = tokenizer()
    vocab = len(tok)
    if kind == "seq2seq":
        cfg = tf.T5Config(
            vocab_size=vocab,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            dropout_rate=0.1,
        )
        model = tf.T5ForConditionalGeneration(cfg)
    elif kind == "causal":
        cfg = tf.GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=160,
            bos_token_id=3,
            eos_token_id=1,
            pad_token_id=0,
        )
        model = tf.GPT2LMHeadModel(cfg)
    elif kind == "cls":
        cfg = tf.BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=160,
            pad_token_id=0,
        )
        model = tf.BertModel(cfg)
    else:
        raise ValueError(kind)
    path = root / kind
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
