"""Tiny models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import torch
import transformers as tf

TINY = dict(vocab_size=99)


def t5(seed: int = 0, **sizes):
    """`sizes`: T5Config fields to override (e.g. a wider d_model)."""
    torch.manual_seed(seed)
    cfg = tf.T5Config(
        **{
            "vocab_size": 99,
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 48,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 4,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
            "eos_token_id": 1,
            **sizes,
        }
    )
    return tf.T5ForConditionalGeneration(cfg).eval()


def mt5(seed: int = 0):
    torch.manual_seed(seed)
    cfg = tf.MT5Config(
        vocab_size=99,
        d_model=32,
        d_kv=8,
        d_ff=40,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    cfg.tie_word_embeddings = False
    return tf.MT5ForConditionalGeneration(cfg).eval()


def bart(seed: int = 0):
    torch.manual_seed(seed)
    cfg = tf.BartConfig(
        vocab_size=99,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=40,
        decoder_ffn_dim=40,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    )
    return tf.BartForConditionalGeneration(cfg).eval()


def gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(
        vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, pad_token_id=0
    )
    return tf.GPT2LMHeadModel(cfg).eval()


def llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=1,
    )
    return tf.LlamaForCausalLM(cfg).eval()


def bert_cls(seed: int = 0, num_labels: int = 3):
    torch.manual_seed(seed)
    cfg = tf.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return tf.BertForSequenceClassification(cfg).eval()


SEQ2SEQ = {"t5": t5, "mt5": mt5, "bart": bart}
CAUSAL = {"gpt2": gpt2, "llama": llama}
ALL = {**SEQ2SEQ, **CAUSAL, "bert": bert_cls}
TASK = {
    "t5": "SEQ_2_SEQ_LM",
    "mt5": "SEQ_2_SEQ_LM",
    "bart": "SEQ_2_SEQ_LM",
    "gpt2": "CAUSAL_LM",
    "llama": "CAUSAL_LM",
    "bert": "SEQ_CLS",
}


def batch(name: str, batch_size: int = 3, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch_size, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # some padding, so masks matter
    out = {"input_ids": ids, "attention_mask": mask}
    if name in SEQ2SEQ:
        out["labels"] = torch.randint(3, 99, (batch_size, 4), generator=g)
    elif name in CAUSAL:
        out["labels"] = ids.masked_fill(mask == 0, -100)
    else:
        out["labels"] = torch.randint(0, 3, (batch_size,), generator=g)
    return out
